"""Measure one onnxruntime-training step of a tinytrain graph (same spec as the PyTorch peer).

    python ort_step.py generate GRAPH.npz full|sparse ARTIFACT_DIR   (needs torch: export + artifacts)
    python ort_step.py measure ARTIFACT_DIR C H W CLASSES STEPS      (prints one JSON line)

The frozen parameters are passed to generate_artifacts as frozen_params, so ORT builds the
gradient graph of the updated ones only. Batch 1, SGD, cross-entropy, one intra-op thread.
"""
import json
import os
import resource
import sys
import time


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def generate(path, mode, out_dir):
    import onnx
    import torch
    from onnxruntime.training import artifacts

    from torch_graph import GraphModule

    model = GraphModule(path, mode)
    c, h, w = model.spec["input_shape"]
    onnx_path = os.path.join(out_dir, "forward.onnx")
    torch.onnx.export(model, torch.zeros(1, c, h, w), onnx_path, input_names=["input"], output_names=["logits"],
                      opset_version=17, training=torch.onnx.TrainingMode.TRAINING, do_constant_folding=False)
    artifacts.generate_artifacts(onnx.load(onnx_path), requires_grad=model.updated, frozen_params=model.frozen,
                                 loss=artifacts.LossType.CrossEntropyLoss, optimizer=artifacts.OptimType.SGD,
                                 artifact_directory=out_dir)


def measure(out_dir, c, h, w, classes, steps):
    import numpy as np
    import onnxruntime
    from onnxruntime.training.api import CheckpointState, Module, Optimizer

    baseline = rss_bytes()
    state = CheckpointState.load_checkpoint(os.path.join(out_dir, "checkpoint"))
    module = Module(os.path.join(out_dir, "training_model.onnx"), state, os.path.join(out_dir, "eval_model.onnx"))
    opt = Optimizer(os.path.join(out_dir, "optimizer_model.onnx"), module)
    opt.set_learning_rate(0.01)
    module.train()
    rng = np.random.default_rng(0)
    times = []
    for _ in range(steps):
        x = rng.standard_normal((1, c, h, w)).astype(np.float32)
        y = rng.integers(0, classes, size=(1,)).astype(np.int64)
        t0 = time.perf_counter()
        module(x, y)
        opt.step()
        module.lazy_reset_grad()
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times.sort()
    print(json.dumps({"framework": f"onnxruntime-training {onnxruntime.__version__}",
                      "peak_rss_over_import_bytes": peak - baseline,
                      "step_ms_median": 1000 * times[len(times) // 2]}))


if __name__ == "__main__":
    if sys.argv[1] == "generate":
        generate(sys.argv[2], sys.argv[3], sys.argv[4])
    else:
        measure(sys.argv[2], *map(int, sys.argv[3:8]))
