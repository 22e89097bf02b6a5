"""Seconds per UNet call of the full-size Taiyi SD UNet, eager against bf16, torch.compile, OpenVINO…, same run.

One call = the classifier-free-guidance batch of 2 at the given size, float32, on the CPU (or the device given).
`compile-frozen` is torch.compile with inductor's `freezing` (weights folded as constants, oneDNN weight
prepacking: the CPU inference setting PyTorch recommends); `batch-1` is the eager UNet on the conditional half only
(what a step without classifier-free guidance costs); `bf16` is the eager UNet under CPU bfloat16 autocast;
`openvino` is taiyi's OpenVINO backend at OpenVINO's own precision (bf16 on CPUs with bf16 instructions, which the
report's machine lists) and `openvino-f32` the same IR held to float32; `onnxruntime` is the same UNet exported to
ONNX (opset 17, fixed shapes, external weights, kept under ``--cache``) and run by ONNX Runtime's CPU provider with
every graph optimisation and the same thread count — it needs ``pip install onnxruntime onnx`` (a run of all
variants leaves it out without them), and its export and loading are reported as its setup. Each variant is checked
against the eager output (cosine, largest difference), and torch.compile's first call (the compilation) is reported
on its own: it must pay for itself before a variant is worth a default.

    python benchmarks/unet_variants.py --size 512 --calls 2 --json unet_variants.json
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).parent))
from _bench import machine, prepare, write_json  # noqa: E402
from sd_speed import full_size_checkpoint  # noqa: E402

VARIANTS = (
    "eager",
    "channels-last",
    "bf16",
    "compile",
    "compile-frozen",
    "batch-1",
    "openvino",
    "openvino-f32",
    "onnxruntime",
)


class OnnxRuntimeUNet:
    """The UNet exported once to ONNX and run by ONNX Runtime, called like the diffusers model."""

    def __init__(self, unet, latents, context, folder: Path) -> None:
        import onnxruntime
        import torch

        from taiyi.backends import _Traceable  # the UNet as OpenVINO's converter traces it

        path = folder / "unet.onnx"
        if not path.exists():  # exported into a temporary folder, renamed into place when complete
            folder.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=".exporting-", dir=folder.parent))
            try:
                with torch.inference_mode(False), torch.no_grad():
                    torch.onnx.export(_Traceable(unet).eval(), (latents, torch.tensor(500), context),
                                      str(tmp / path.name), dynamo=False, opset_version=17,
                                      input_names=["sample", "timestep", "context"], output_names=["out"])  # fmt: skip
                shutil.rmtree(folder, ignore_errors=True)
                tmp.rename(folder)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def __call__(self, sample, timestep, encoder_hidden_states):
        import torch

        feeds = {"sample": sample.numpy(), "timestep": timestep.numpy(), "context": encoder_hidden_states.numpy()}
        return SimpleNamespace(sample=torch.from_numpy(self.session.run(None, feeds)[0]))


class OpenVinoUNet:
    """taiyi's OpenVINO backend (the converted, cached IR), called like the diffusers model."""

    def __init__(self, unet, precision: str | None) -> None:
        from taiyi.backends import compile_unet

        self.request = compile_unet(unet, precision=precision).create_infer_request()
        self.precision = self.request.get_compiled_model().get_property("INFERENCE_PRECISION_HINT").to_string()

    def __call__(self, sample, timestep, encoder_hidden_states):
        import numpy as np
        import torch

        t = torch.as_tensor(timestep, dtype=torch.float32).reshape(-1).expand(sample.shape[0])
        self.request.infer([sample.numpy(), np.ascontiguousarray(t.numpy()), encoder_hidden_states.numpy()])
        return SimpleNamespace(sample=torch.from_numpy(self.request.get_output_tensor(0).data.copy()))


class Bf16Autocast:
    """The eager UNet under CPU bfloat16 autocast, float32 out."""

    def __init__(self, unet) -> None:
        self.unet = unet

    def __call__(self, sample, timestep, encoder_hidden_states):
        import torch

        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states).sample
        return SimpleNamespace(sample=out.float())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", default=str(Path.home() / ".cache" / "taiyi-bench" / "taiyi-sd-full-random"))
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--calls", type=int, default=2, help="timed calls per variant (after one warm-up)")
    parser.add_argument("--variant", action="append", choices=VARIANTS, help="repeatable (default: all)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    prepare(args.threads)
    import torch
    from diffusers import UNet2DConditionModel

    folder = full_size_checkpoint(Path(args.cache))
    torch.manual_seed(0)
    latents = torch.randn(2, 4, args.size // 8, args.size // 8)
    context = torch.randn(2, 77, 768)
    eager = UNet2DConditionModel.from_pretrained(folder, subfolder="unet").eval()

    def call(model, t: int = 500, batch: int = 2):
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model(latents[:batch], torch.tensor(t), encoder_hidden_states=context[:batch]).sample
        return out, time.perf_counter() - t0

    reference, _ = call(eager)
    rows = []
    variants = args.variant or VARIANTS
    for package, needs in (("onnxruntime", ("onnxruntime",)), ("openvino", ("openvino", "openvino-f32"))):
        if importlib.util.find_spec(package) is None and set(needs) & set(variants):
            if args.variant:
                parser.exit(2, f"the {'/'.join(needs)} variant needs: pip install {package}\n")
            variants = tuple(v for v in variants if v not in needs)
    for variant in variants:
        start, notes = time.perf_counter(), ""
        if variant in ("eager", "batch-1"):
            model = eager
        elif variant == "onnxruntime":
            model = OnnxRuntimeUNet(eager, latents, context, Path(args.cache) / f"onnx-{args.size}")
        elif variant in ("openvino", "openvino-f32"):
            model = OpenVinoUNet(eager, "f32" if variant == "openvino-f32" else None)
            notes = f"OpenVINO precision {model.precision}"
        elif variant == "bf16":
            model = Bf16Autocast(eager)
        elif variant == "channels-last":
            model = eager.to(memory_format=torch.channels_last)
        else:
            import torch._inductor.config as inductor

            inductor.freezing = variant == "compile-frozen"
            torch._dynamo.reset()
            model = torch.compile(eager.to(memory_format=torch.contiguous_format))
        batch = 1 if variant == "batch-1" else 2
        setup = time.perf_counter() - start
        out, first = call(model, batch=batch)
        seconds = [call(model, 500 - 100 * i, batch)[1] for i in range(args.calls)]
        out, _ = call(model, batch=batch)
        cosine = float(torch.nn.functional.cosine_similarity(out.flatten(), reference[:batch].flatten(), dim=0))
        row = {"variant": variant, "setup_s": round(setup, 2), "first_call_s": round(first, 2),
               "call_s": round(min(seconds), 3), "cosine_to_eager": cosine,
               "max_abs_diff": float((out - reference[:batch]).abs().max()), "notes": notes}  # fmt: skip
        rows.append(row)
        print(f"{variant:>14}  setup {setup:6.1f} s  first call {first:7.1f} s  per call {min(seconds):6.2f} s"
              f"  cosine {cosine:.7f}  {notes}", flush=True)  # fmt: skip
    report = {"size": args.size, "rows": rows, "machine": machine()}
    if args.json:
        write_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
