"""Encoder-decoder Hugging Face models (T5 family) to ONNX: an encoder graph and a decoder graph without KV cache,
zipped together (worker.formats.onnx_pair) and checked in ONNX Runtime against the torch model."""

from pathlib import Path

import torch

from app.core.errors import ErrorCode
from worker.errors import JobFailure
from worker.formats import onnx_pair
from worker.formats.hf import HFModel, check_agreement
from worker.formats.loaded import hf_model_of

OPSET = 17


class EncoderGraph(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.encoder = model.get_encoder()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.encoder(input_ids=input_ids, attention_mask=attention_mask, return_dict=True).last_hidden_state


class DecoderGraph(torch.nn.Module):
    """The whole model given the encoder's output: the decoder (and LM head) on a full decoder sequence."""

    def __init__(self, model: torch.nn.Module, output_name: str) -> None:
        super().__init__()
        self.model, self.output_name = model, output_name

    def forward(self, decoder_input_ids: torch.Tensor, encoder_hidden_states: torch.Tensor,
                encoder_attention_mask: torch.Tensor) -> torch.Tensor:
        outputs = self.model(encoder_outputs=(encoder_hidden_states,), attention_mask=encoder_attention_mask,
                             decoder_input_ids=decoder_input_ids, use_cache=False, return_dict=True)
        return outputs[self.output_name]


def export_pair(hf: HFModel, path: Path, module: torch.nn.Module | None = None, batch: int = 2,
                seq: int = 16) -> Path:
    """`module`: the adapter as the steps left it (else the uploaded one). Writes the zip at `path`."""
    module = module or hf.module
    inner = hf_model_of(module) or hf.model
    output_name = hf.output_names[0]
    input_ids, attention_mask, decoder_input_ids = hf.example_inputs(batch, seq)
    encoder_path = path.with_name(f"{path.stem}-encoder.onnx")
    decoder_path = path.with_name(f"{path.stem}-decoder.onnx")
    text = {0: "batch", 1: "sequence"}
    previous = inner.config._attn_implementation
    try:
        inner.set_attn_implementation("eager")
        with torch.inference_mode(False), torch.no_grad():
            encoder = EncoderGraph(inner).eval()
            hidden = encoder(input_ids, attention_mask)
            torch.onnx.export(encoder, (input_ids, attention_mask), f=str(encoder_path), dynamo=False,
                              opset_version=OPSET, input_names=onnx_pair.ENCODER_INPUTS,
                              output_names=["last_hidden_state"], do_constant_folding=True,
                              dynamic_axes={"input_ids": text, "attention_mask": text, "last_hidden_state": text})
            torch.onnx.export(DecoderGraph(inner, output_name).eval(), (decoder_input_ids, hidden, attention_mask),
                              f=str(decoder_path), dynamo=False, opset_version=OPSET,
                              input_names=onnx_pair.DECODER_INPUTS, output_names=[output_name],
                              do_constant_folding=True,
                              dynamic_axes={"decoder_input_ids": {0: "batch", 1: "decoder_sequence"},
                                            "encoder_hidden_states": text, "encoder_attention_mask": text,
                                            output_name: {0: "batch", 1: "decoder_sequence"}})
    except Exception as exc:
        raise JobFailure(ErrorCode.EXPORT_FAILED, f"could not export the encoder-decoder to ONNX: "
                                                  f"{exc.__class__.__name__}: {str(exc)[:300]}") from None
    finally:
        inner.set_attn_implementation(previous)
    config = inner.config
    onnx_pair.write_pair(encoder_path, decoder_path, path, {"decoder_start_token_id": config.decoder_start_token_id,
                                                            "eos_token_id": config.eos_token_id}, output_name)
    encoder_path.unlink()
    decoder_path.unlink()
    _check(hf, module, path, batch + 1, seq + 3, seq - 5)
    return path


def _check(hf: HFModel, module: torch.nn.Module, path: Path, batch: int, seq: int, decoder_seq: int) -> None:
    """Run the pair on another batch, length and decoder length than the export saw, against the module."""
    check = hf.example_inputs(batch, seq, seed=1, decoder_seq=decoder_seq)
    with torch.inference_mode():
        expected = [t.float().numpy() for t in module(*check)]
    try:
        got = onnx_pair.open_pair(path, "cpu", 1)([t.numpy() for t in check])
    except JobFailure:
        raise
    except Exception as exc:
        raise JobFailure(ErrorCode.EXPORT_FAILED, f"ONNX Runtime cannot run the exported encoder-decoder: "
                                                  f"{exc.__class__.__name__}: {str(exc)[:300]}") from None
    check_agreement(hf.output_names, expected, got)
