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
def save_foreign_cnn(path: Path, opset: int = 11, size: int = 32, constants: bool = True) -> Path:
    """A small conv net written the way other exporters write them: weights as Constant nodes, the same bias
    tensor stored twice, an unused weight, opset 11. Stem 3x3 conv (tiny), 3x3 conv, depthwise 3x3, pointwise
    1x1, global pooling, Gemm; batch dimension symbolic."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)

    def weight(*shape):
        return (rng.standard_normal(shape) * np.sqrt(2.0 / np.prod(shape[1:]))).astype(np.float32)

    tensors = {"stem_w": weight(16, 3, 3, 3), "stem_b": np.full(16, 0.1, np.float32),
               "conv_w": weight(32, 16, 3, 3), "conv_b": np.full(32, 0.1, np.float32),
               "dw_w": weight(32, 1, 3, 3), "dw_b": np.full(32, 0.1, np.float32),  # same bytes as conv_b
               "pw_w": weight(64, 32, 1, 1), "pw_b": np.zeros(64, np.float32),
               "fc_w": weight(10, 64), "fc_b": np.zeros(10, np.float32), "unused": weight(8, 8)}
    nodes = [helper.make_node("Conv", ["x", "stem_w", "stem_b"], ["s"], name="stem", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["s"], ["s1"], name="stem_relu"),
             helper.make_node("Conv", ["s1", "conv_w", "conv_b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["c1"], name="conv_relu"),
             helper.make_node("Conv", ["c1", "dw_w", "dw_b"], ["d"], name="depthwise", pads=[1, 1, 1, 1], group=32),
             helper.make_node("Relu", ["d"], ["d1"], name="depthwise_relu"),
             helper.make_node("Conv", ["d1", "pw_w", "pw_b"], ["p"], name="pointwise"),
             helper.make_node("Relu", ["p"], ["p1"], name="pointwise_relu"),
             helper.make_node("GlobalAveragePool", ["p1"], ["g"], name="pool"),
             helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["y"], name="fc", transB=1)]
    initializers = []
    if constants:
        nodes = [helper.make_node("Constant", [], [name], value=numpy_helper.from_array(array, name))
                 for name, array in tensors.items()] + nodes
    else:
        initializers = [numpy_helper.from_array(array, name) for name, array in tensors.items()]
    graph = helper.make_graph(nodes, "foreign_cnn",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, size, size])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=7)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def save_conv_only_onnx(path):
    """Two Convs and no MatMul: nothing for weight-only quantization (MatMul/Gemm weights) to take."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.normal(size=(8, 3, 3, 3)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.normal(size=(4, 8, 3, 3)).astype(np.float32), "w2")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w1"], ["h"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("Conv", ["r", "w2"], ["y"], pads=[1, 1, 1, 1])], "convs",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4, 16, 16])], initializer=[w1, w2])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path
