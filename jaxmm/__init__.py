"""jaxmm: a multimodal LLM inference engine in JAX.

from jaxmm import LLM, SamplingParams
llm = LLM(model="/path/to/checkpoint")
print(llm.generate("Hello", SamplingParams(max_tokens=16))[0].outputs[0].text)
"""

from jaxmm import quiet as _quiet
from jaxmm.outputs import (
    CompletionOutput,
    EmbeddingOutput,
    EmbeddingRequestOutput,
    Logprob,
    RequestOutput,
)
from jaxmm.pooling import PoolingParams
from jaxmm.sampling_params import SamplingParams

# before transformers or JAX load (none of the above imports them): their notices that are
# not the user's business
_quiet.install()

__version__ = "0.1.0"
__all__ = [
    "LLM",
    "SamplingParams",
    "PoolingParams",
    "RequestOutput",
    "CompletionOutput",
    "EmbeddingRequestOutput",
    "EmbeddingOutput",
    "Logprob",
    "__version__",
]


def __getattr__(name):
    # LLM pulls in JAX; import it on first use so `import jaxmm` stays light
    if name == "LLM":
        from jaxmm.llm import LLM

        return LLM
    raise AttributeError(f"module 'jaxmm' has no attribute {name!r}")
