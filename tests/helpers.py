"""Tiny models made inside the tests."""

from pathlib import Path


def make_mlp(in_features: int = 16, hidden: int = 32, out_features: int = 4, seed: int = 0):
    import torch

    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(in_features, hidden), torch.nn.ReLU(),
                               torch.nn.Linear(hidden, hidden), torch.nn.ReLU(),
                               torch.nn.Linear(hidden, out_features)).eval()


def save_pt2(path: Path, in_features: int = 16, hidden: int = 32, out_features: int = 4, batch: int = 4) -> Path:
    import torch

    program = torch.export.export(make_mlp(in_features, hidden, out_features), (torch.randn(batch, in_features),))
    torch.export.save(program, str(path))
    return path


def save_onnx(path: Path, in_features: int = 16, hidden: int = 32, out_features: int = 4, batch: int = 4) -> Path:
    import torch

    torch.onnx.export(make_mlp(in_features, hidden, out_features), (torch.randn(batch, in_features),), str(path),
                      dynamo=True, external_data=False, verbose=False)
    return path


TINY_BERT = {"vocab_size": 100, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
             "intermediate_size": 64}
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *(f"w{i}" for i in range(95))]


def pack(folder: Path, archive: Path) -> Path:
    """A folder as an upload: a zip or tar.gz (by suffix) with the folder as its single top-level entry."""
    import tarfile
    import zipfile

    if archive.name.endswith(".zip"):
        with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as out:
            for path in sorted(folder.rglob("*")):
                out.write(path, f"{folder.name}/{path.relative_to(folder).as_posix()}")
    else:
        with tarfile.open(archive, "w:gz") as out:
            out.add(folder, arcname=folder.name)
    return archive


def save_tiny_causal_lm(folder: Path, family: str):
    """A tiny GPT-2 or LLaMA (random weights) with a word-level tokenizer over VOCAB, save_pretrained'd."""
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    torch.manual_seed(0)
    if family == "gpt2":
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=len(VOCAB), n_positions=64, n_embd=32,
                                                                     n_layer=2, n_head=2))
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=len(VOCAB), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=64))
    model.eval().save_pretrained(folder)
    words = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=words, unk_token="[UNK]",
                                         pad_token="[PAD]").save_pretrained(folder)
    return model


def save_tiny_image_model(folder: Path, family: str, num_labels: int = 3):
    """A tiny ViT or ConvNeXt image classifier (random weights, 32 x 32 RGB), save_pretrained'd."""
    import torch
    import transformers

    torch.manual_seed(0)
    if family == "vit":
        config = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, intermediate_size=64, num_labels=num_labels)
        model = transformers.ViTForImageClassification(config)
    else:
        config = transformers.ConvNextConfig(image_size=32, num_channels=3, hidden_sizes=[16, 32], depths=[1, 1],
                                             num_stages=2, num_labels=num_labels)
        model = transformers.ConvNextForImageClassification(config)
    model.eval().save_pretrained(folder)
    return model


def save_tiny_bert(folder: Path, num_labels: int | None = 3, seed: int = 0, **config_changes):
    """A tiny BERT (classifier when num_labels, else base encoder) with an offline tokenizer, save_pretrained'd;
    `config_changes` override TINY_BERT's config."""
    import torch
    import transformers

    torch.manual_seed(seed)
    config = transformers.BertConfig(**{**TINY_BERT, **config_changes},
                                     **({"num_labels": num_labels} if num_labels else {}))
    model = (transformers.BertForSequenceClassification(config) if num_labels else transformers.BertModel(config))
    model.eval().save_pretrained(folder)
    vocab = folder.parent / f"{folder.name}-vocab.txt"
    vocab.write_text("\n".join(VOCAB))
    transformers.BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(folder)
    return model


def save_tiny_t5(folder: Path):
    """A tiny T5 (random weights) with a word-level tokenizer over VOCAB ([PAD] = 0 is also the decoder start
    token, as in T5), save_pretrained'd."""
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    torch.manual_seed(0)
    config = transformers.T5Config(vocab_size=len(VOCAB), d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                   num_decoder_layers=2, num_heads=2, relative_attention_num_buckets=8,
                                   pad_token_id=0, eos_token_id=3, decoder_start_token_id=0)
    model = transformers.T5ForConditionalGeneration(config)
    model.eval().save_pretrained(folder)
    words = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=words, unk_token="[UNK]", pad_token="[PAD]",
                                         eos_token="[SEP]").save_pretrained(folder)
    return model
