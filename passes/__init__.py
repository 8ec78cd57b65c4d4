"""Graph passes of onnxvq, one per module, each an ``onnx_ir`` pass configured by its constructor."""

from onnxvq.passes.annotate_memory_access import AnnotateMemoryAccessPass
from onnxvq.passes.attach_vq_functions import AttachVQFunctionsPass
from onnxvq.passes.decompress_vq_ops import DecompressVQOpsPass
from onnxvq.passes.replace_activations_with_pwlu import ReplaceActivationsWithPWLUPass
from onnxvq.passes.replace_with_vq_ops import ReplaceWithVQOpsPass

__all__ = ["AnnotateMemoryAccessPass", "AttachVQFunctionsPass", "DecompressVQOpsPass", "ReplaceActivationsWithPWLUPass",
           "ReplaceWithVQOpsPass"]
