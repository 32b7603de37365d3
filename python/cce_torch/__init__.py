"""cce for PyTorch: fused linear layer + softmax cross-entropy that never materialises the logits."""

from .functional import LinearCrossEntropy, LinearCrossEntropyOutput, linear_cross_entropy, loss_and_grad

__all__ = ["LinearCrossEntropy", "LinearCrossEntropyOutput", "linear_cross_entropy", "loss_and_grad"]
