"""GoT rollout engine for Janus-Pro: paged KV cache, group prefix sharing, interleaved text/image batching."""
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.outputs import GroupOutput, SampleOutput
from engine.sampling_params import SamplingParams

__all__ = ["LLMEngine", "EngineConfig", "SamplingParams", "GroupOutput", "SampleOutput"]
