"""Smoke test of benchmarks/ants_share.py: one seed, a short stream, two cells; the verdict keys are computed."""

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "ants_share.py"


def test_ants_share_benchmark_smoke(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("ants_share", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    res = mod.main(["--seeds", "0", "--n", "300", "--shares", "0.1,0.9", "--orders", "ood_first",
                    "--n-words", "800", "--json", str(tmp_path / "r.json")])
    assert set(res["cells"]) == {"10% OOD, ood_first", "90% OOD, ood_first"}
    for cell in res["cells"].values():
        for k in ("neglabel_fpr95", "ants_fpr95", "neglabel_auroc", "ants_auroc"):
            assert 0.0 <= cell[k] <= 1.0
        assert abs(cell["diff_fpr95"] - (cell["ants_fpr95"] - cell["neglabel_fpr95"])) < 1e-9
    assert res["worst_diff_fpr95"] == max(c["diff_fpr95"] for c in res["cells"].values())
    assert (tmp_path / "r.json").is_file() and "NegLabel FPR95" in capsys.readouterr().out


@pytest.mark.parametrize("args,says", [
    (["--ants", "{bad"], "--ants is not valid JSON"),
    (["--ants", "[1]"], "must be a JSON object"),
    (["--ants", '{"percentil": 1.0}'], "unknown ANTSState option(s) percentil"),
    (["--orders", "id_first,sideways"], "unknown order(s) sideways"),
    (["--shares", "0.1,1.5"], "strictly between 0 and 1"),
    (["--seeds", "0,x"], "--seeds takes integers"),
])
def test_ants_share_bad_flags_are_one_line_errors(args, says, capsys):
    spec = importlib.util.spec_from_file_location("ants_share", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    with pytest.raises(SystemExit) as exc:
        mod.main(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err
