"""gotr1: GoT-R1 generation, rewards and GRPO training on Janus-Pro."""
import kernels  # noqa: F401  (first: on CPU it selects Triton's interpreter before anything decorates a kernel)
