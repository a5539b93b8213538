"""TransformersDescriber through the real transformers code path, on tiny random BLIP and Qwen2-VL models saved to
local folders (offline): loading, chat template, batched generation, answer parsing."""

import pytest
import torch
from PIL import Image

from clip_ood.describers import DESCRIBE_PROMPT, TransformersDescriber

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
            "<|video_pad|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}{% if c['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _byte_level_bpe(text: str, specials: list[str]):
    """A tiny byte-level BPE (GPT-2 style) trained on the describer prompt and ``text``, with ``specials``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator([DESCRIBE_PROMPT, text] * 5,
                            trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return bpe


@pytest.fixture(scope="module")
def blip_dir(tmp_path_factory):
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
    )

    d = tmp_path_factory.mktemp("tiny_blip")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "a", "photo", "of", "cat", "dog", "red", "the"]
    (d / "vocab.txt").write_text("\n".join(words) + "\n")
    proc = BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}),
                         tokenizer=BertTokenizer(str(d / "vocab.txt"), bos_token="[DEC]"))
    torch.manual_seed(0)
    cfg = BlipConfig(
        text_config=dict(vocab_size=len(words), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=64, bos_token_id=5, pad_token_id=0,
                         sep_token_id=3, eos_token_id=3),
        vision_config=dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                           image_size=32, patch_size=8),
        projection_dim=16)
    BlipForConditionalGeneration(cfg).save_pretrained(str(d))
    proc.save_pretrained(str(d))
    return d


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    from transformers import (
        Qwen2TokenizerFast,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    d = tmp_path_factory.mktemp("tiny_qwen2vl")
    bpe = _byte_level_bpe("a red cat, a dog, names of object classes", SPECIALS)
    tok = Qwen2TokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                             unk_token=None, bos_token=None)
    pix = dict(min_pixels=28 * 28, max_pixels=56 * 56, patch_size=14, merge_size=2, temporal_patch_size=2)
    proc = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(**pix), tokenizer=tok,
                            video_processor=Qwen2VLVideoProcessor(**pix), chat_template=CHAT_TEMPLATE)
    ids = {s: tok.convert_tokens_to_ids(s) for s in SPECIALS}
    cfg = Qwen2VLConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                         rope_scaling={"type": "mrope", "mrope_section": [2, 2, 4]}, eos_token_id=ids["<|im_end|>"],
                         pad_token_id=ids["<|endoftext|>"], bos_token_id=None),
        vision_config=dict(depth=1, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, in_channels=3),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    torch.manual_seed(0)
    Qwen2VLForConditionalGeneration(cfg).save_pretrained(str(d))
    proc.save_pretrained(str(d))
    return d


def test_blip_captioner_from_a_local_folder(blip_dir):
    td = TransformersDescriber(kind="blip", model=str(blip_dir), device="cpu", max_new_tokens=5, dtype="float32")
    out = td.describe([Image.new("RGB", (20, 20), "red"), Image.new("L", (24, 16))])
    assert td.loaded and len(out) == 2 and all(isinstance(s, str) for s in out)


def test_qwen2vl_batched_generation_equals_one_by_one(qwen_dir):
    td = TransformersDescriber(kind="qwen2-vl", model=str(qwen_dir), device="cpu", max_new_tokens=5,
                               dtype="float32")
    small, tall = Image.new("RGB", (28, 28), "green"), Image.new("RGB", (30, 60), "blue")  # 1 vs 2 image tokens
    batched = td.describe([small, tall])
    assert td._processor.tokenizer.padding_side == "left"
    # with left padding, a batch of prompts of different lengths decodes as each prompt alone (greedy)
    assert batched == td.describe([small]) + td.describe([tall])
    names = td.similar_labels("cat", k=3)
    assert isinstance(names, list) and len(names) <= 3 and all(n.lower() != "cat" for n in names)


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    from transformers import (
        CLIPImageProcessor,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )

    d = tmp_path_factory.mktemp("tiny_llava")
    bpe = _byte_level_bpe("USER: ASSISTANT: a red cat", ["<unk>", "<s>", "</s>", "<image>", "<pad>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                  pad_token="<pad>", extra_special_tokens={"image_token": "<image>"})
    template = ("{% for m in messages %}{{ m['role'].upper() }}: {% for c in m['content'] %}"
                "{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %} {% endfor %}"
                "{% if add_generation_prompt %}ASSISTANT:{% endif %}")
    proc = LlavaProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 28},
                                                             crop_size={"height": 28, "width": 28}),
                          tokenizer=tok, patch_size=14, vision_feature_select_strategy="default",
                          chat_template=template, image_token="<image>", num_additional_image_tokens=1)
    cfg = LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                           num_attention_heads=2, image_size=28, patch_size=14, projection_dim=16),
        text_config=dict(model_type="llama", vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        image_token_index=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-1)
    torch.manual_seed(0)
    LlavaForConditionalGeneration(cfg).save_pretrained(str(d))
    proc.save_pretrained(str(d))
    return d


def test_llava_describer_from_a_local_folder(llava_dir):
    td = TransformersDescriber(kind="llava", model=str(llava_dir), device="cpu", max_new_tokens=5, dtype="float32")
    a, b = Image.new("RGB", (28, 28), "green"), Image.new("RGB", (30, 60), "blue")
    assert td.describe([a, b]) == td.describe([a]) + td.describe([b])
    names = td.similar_labels("cat", k=3)
    assert isinstance(names, list) and len(names) <= 3
