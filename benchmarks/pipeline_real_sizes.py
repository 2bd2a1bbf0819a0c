"""Real-size pipeline parts exported on this 24 GB machine, their peak memory beside their weights' size:
CogVideoX-2B's transformer (1.69 B parameters) in fp16 and the T5-XXL text encoder CogVideoX reads prompts with
(google/t5-v1_1-xxl's layout, 4.76 B parameters) in fp16, each made directly in its dtype from seeded random
weights (no checkpoint can be downloaded here; a real folder loads the same classes) and written by f3export's
exporter with external data.

    python benchmarks/pipeline_real_sizes.py --out /tmp/real-sizes      # about 15 min, 14 GB of disk at a time

Each export's peak resident memory (the process's, the model included) is measured from a reset high-water mark,
and compared with the weights' bytes (the goal: at most twice). Each file is checked by ``onnx.checker`` by path
and its initializers counted against the model's parameters; then removed, so the two need not fit on disk
together. The transformer is traced at 2 latent frames of the real 60 x 90 latent grid (CogVideoX-2B's sincos
positions fix the traced shape; 13 frames would need a 19 GB attention matrix to trace on a CPU), the encoder at
its 226 tokens.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import onnx
import torch
from torch import nn
from transformers import T5Config, T5EncoderModel

from f3export.export import export_onnx, onnx_parameter_count
from f3export.models import get_adapter
from f3export.models.base import ExportSpec, VideoShape
from f3export.models.memory import peak_rss_mib, reset_peak_rss
from f3export.prune import parameter_count

# google/t5-v1_1-xxl's config.json (the text_encoder/ of THUDM/CogVideoX-2b and -5b)
T5_XXL = {"d_model": 4096, "d_ff": 10240, "d_kv": 64, "num_heads": 64, "num_layers": 24, "vocab_size": 32128,
          "feed_forward_proj": "gated-gelu", "relative_attention_num_buckets": 32, "layer_norm_epsilon": 1e-6,
          "tie_word_embeddings": False, "is_encoder_decoder": False}


class EncoderNet(nn.Module):
    """input_ids -> last hidden state: what f3export's text encoder component exports for CogVideoX (unmasked)."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.encoder(input_ids)[0]


def made_in(dtype: torch.dtype, make) -> tuple[nn.Module, dict]:
    """A model made with every weight in ``dtype`` from the start (never a float32 copy), timed and measured."""
    reset_peak_rss()
    start = time.perf_counter()
    torch.set_default_dtype(dtype)
    try:
        model = make().eval()
    finally:
        torch.set_default_dtype(torch.float32)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return model, {"seconds": round(time.perf_counter() - start, 1), "peak_rss_mib": peak_rss_mib(),
                   "weight_bytes": weights, "weight_mib": round(weights / 2**20), "dtype": str(dtype)}


def export_measured(model: nn.Module, spec: ExportSpec, path: Path, weight_bytes: int) -> dict:
    reset_peak_rss()
    start = time.perf_counter()
    info = export_onnx(model, spec, path, opset=17, external_data="always")
    seconds, peak = time.perf_counter() - start, peak_rss_mib()
    onnx.checker.check_model(str(path), full_check=True)
    counted = onnx_parameter_count(onnx.load(str(path), load_external_data=False))
    sizes = {f.name: f.stat().st_size for f in info.files}
    for file in info.files:
        file.unlink()
    return {"seconds": round(seconds, 1), "peak_rss_mib": peak,
            "peak_over_weights": round(peak * 2**20 / weight_bytes, 2),
            "parameters_torch": parameter_count(model), "parameters_onnx": counted, "bytes": sizes}


def transformer(out: Path) -> dict:
    adapter = get_adapter("cogvideox")
    model, made = made_in(torch.float16, lambda: adapter.checkpoint.load_preset("cogvideox-2b", seed=0).model)
    print(f"cogvideox-2b made: {made}", flush=True)
    spec = adapter.export_spec(model, VideoShape(2, 60, 90), batch=1, dynamic=["batch"])
    spec = ExportSpec({k: v.to(torch.float16) if v.is_floating_point() else v for k, v in spec.inputs.items()},
                      spec.output_names, spec.dynamic_axes)
    return {"made": made, "export": export_measured(model, spec, out / "cogvideox-2b.onnx", made["weight_bytes"])}


def text_encoder(out: Path) -> dict:
    torch.manual_seed(0)
    # fp16, not the bf16 T5 ships in: torch.onnx's TorchScript exporter fails on T5's attention in bf16
    # ("ScalarType ComplexDouble is an unexpected tensor scalar type"); fp16 has the same bytes per weight
    model, made = made_in(torch.float16, lambda: EncoderNet(T5EncoderModel(T5Config(**T5_XXL))))
    print(f"t5-xxl made: {made}", flush=True)
    ids = torch.randint(2, T5_XXL["vocab_size"], (1, 226), generator=torch.Generator().manual_seed(0))
    spec = ExportSpec({"input_ids": ids}, ["text_embeddings"], {"input_ids": {0: "batch"}})
    return {"made": made, "export": export_measured(model, spec, out / "t5-xxl.onnx", made["weight_bytes"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("artifacts/real-sizes"))
    parser.add_argument("--only", choices=("transformer", "text_encoder"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = {}
    for name, run in (("transformer", transformer), ("text_encoder", text_encoder)):
        if args.only in (None, name):
            results[name] = run(args.out)
            print(f"{name}: {json.dumps(results[name])}", flush=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
