"""A model's multimodal interface as plain data, for a front end that has no model object.

Under `jaxmm serve` the engine (and the model) live in the engine's own process. The server
process still renders chat messages with media parts into prompts: it must know which
modalities the model takes, what placeholder text marks each item, and the media limits.
`DeclaredInterface.of(model, tokenizer)` reads that from the model's declared interface in
the engine process; it is pickled to the server process with the engine's "ready" message,
where `ChatFrontend` offers what `chat_parts.conversation_to_mm_prompt` reads of a front end.
The prompts themselves are then prepared (media decoded, processed, hashed, placeholders
expanded) by the engine's own front end: `PendingPrompt` carries them there.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .media import MediaPolicy


@dataclass(frozen=True)
class DeclaredInterface:
    name: str  # the model class's name, for messages
    mm_modalities: tuple[str, ...]
    is_encoder_decoder: bool
    placeholders: dict = field(default_factory=dict)  # modality -> placeholder text
    is_multimodal: bool = True

    @classmethod
    def of(cls, model, tokenizer) -> DeclaredInterface:
        modalities = tuple(getattr(model, "mm_modalities", ()))
        placeholders = {}
        for m in modalities:
            if hasattr(model, "mm_placeholder_text"):
                placeholders[m] = model.mm_placeholder_text(m)
            elif tokenizer is not None and hasattr(model, "mm_prompt_placeholder"):
                ids = model.mm_prompt_placeholder(m)
                placeholders[m] = "".join(tokenizer.convert_ids_to_tokens(ids))
        return cls(
            name=type(model).__name__,
            mm_modalities=modalities,
            is_encoder_decoder=bool(getattr(model, "is_encoder_decoder", False)),
            placeholders=placeholders,
        )

    def mm_placeholder_text(self, modality: str) -> str:
        return self.placeholders[modality]


class ChatFrontend:
    """What chat rendering reads of a front end, from a `DeclaredInterface`."""

    def __init__(self, interface: DeclaredInterface, tokenizer, config):
        self.model = interface
        self.tokenizer = tokenizer
        self.config = config
        overrides = {}
        if config.allowed_local_media_path is not None:
            overrides["allowed_local_media_path"] = config.allowed_local_media_path
        if config.allowed_media_domains is not None:
            overrides["allowed_media_domains"] = config.allowed_media_domains
        self.policy = MediaPolicy.from_env(**overrides)

    def placeholder_text(self, modality: str) -> str:
        return self.model.mm_placeholder_text(modality)


@dataclass
class PendingPrompt:
    """A prompt for the engine's own front end to prepare, in the engine's process.

    kind: "multimodal" (`args` = (prompt dict,)) or "transcription" (`args` = (samples,
    sample_rate), `kwargs` = language / prompt / task).
    """

    kind: str
    args: tuple
    kwargs: dict = field(default_factory=dict)

    def prepare(self, engine):
        """-> (text, prompt token ids, the request's multimodal inputs), with the engine's
        front ends (`engine.mm_frontend()` / `engine.audio_frontend()`)."""
        from .inputs import prepare_multimodal_prompt, transcription_prompt

        if self.kind == "multimodal":
            return prepare_multimodal_prompt(engine, *self.args)
        if self.kind == "transcription":
            return transcription_prompt(engine, *self.args, **self.kwargs)
        raise ValueError(f"unknown pending prompt kind {self.kind!r}")
