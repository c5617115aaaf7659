"""The `jaxmm` command: serve | generate | chat | bench | convert.

    jaxmm serve [MODEL] [--port 8000] [--api-key KEY] ...   OpenAI-compatible server
    jaxmm generate "Once upon a time" [--model M]            one-shot completion
    jaxmm chat [--model M] [--message "Hi"]                  chat REPL (or one message)
    jaxmm bench [--model M] [--num-prompts 64]               offline throughput, JSON
    jaxmm convert ct2-whisper SRC DST                        checkpoint conversion

Engine flags are named like vLLM's (`vllm serve --help`). MODEL is a local checkpoint
directory or a .gguf file; without one, the embedded default model is used.
Heavy imports (JAX, the engine) happen only once a command runs, so `--help` is instant.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys

_MEDIA_KINDS = ("image", "video", "audio")
TRUST_REMOTE_CODE_NOTE = (
    "--trust-remote-code has no effect: jaxmm never fetches or runs code from a checkpoint; "
    "every architecture it serves is implemented in jaxmm itself (see docs/supported_models.md)"
)
# the served name of the embedded default model (its file is SmolLM2-135M-Instruct.Q4_1.gguf)
DEFAULT_SERVED_NAME = "SmolLM2-135M-Instruct"


# -- flag parsers ------------------------------------------------------------------------------


def parse_size(text: str) -> int:
    """'1073741824', '1G', '512MiB', '1.5GB' -> bytes (K/M/G/T in binary units)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)(?:i?[bB])?\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 4G, 512M, 1073741824)")
    scale = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}[m.group(2).lower()]
    return int(float(m.group(1)) * scale)


def parse_limit_mm(text: str) -> dict:
    """'{"image": 2}' or 'image=2,video=1' -> {"image": 2, "video": 1}."""
    text = text.strip()
    if text.startswith("{"):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            raise argparse.ArgumentTypeError(f"invalid JSON: {e}") from None
    else:
        value = {}
        for item in filter(None, (p.strip() for p in text.split(","))):
            key, sep, num = item.partition("=")
            if not sep:
                raise argparse.ArgumentTypeError(f"expected KIND=COUNT, got {item!r}")
            try:
                value[key.strip()] = int(num)
            except ValueError:
                raise argparse.ArgumentTypeError(f"{item!r}: the count is not an integer") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object or KIND=COUNT,...")
    for key, count in value.items():
        if key not in _MEDIA_KINDS:
            raise argparse.ArgumentTypeError(f"unknown media kind {key!r}; use {_MEDIA_KINDS}")
        if (
            isinstance(count, bool)
            or not isinstance(count, (int, dict))
            or (isinstance(count, int) and count < 0)
        ):
            raise argparse.ArgumentTypeError(f"{key}: the limit must be an integer >= 0")
    return value


def parse_json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"invalid JSON: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object")
    return value


def load_chat_template(value: str | None) -> str | None:
    """A file path, an inline Jinja template, or a template kept by name (`llava`, ...:
    jaxmm/multimodal/chat_templates.py)."""
    if value is None:
        return None
    if os.path.isfile(value):
        with open(value, encoding="utf-8") as f:
            return f.read()
    if "{" in value:
        return value
    from jaxmm.multimodal.chat_templates import NAMED_TEMPLATES

    if value in NAMED_TEMPLATES:
        return NAMED_TEMPLATES[value]
    raise ValueError(
        f"--chat-template {value!r} is neither a file, a Jinja template nor a known template "
        f"name ({', '.join(sorted(NAMED_TEMPLATES))})"
    )


# -- engine flags ------------------------------------------------------------------------------


_GROUP_TITLES = {
    "model": "model",
    "cache": "KV cache",
    "scheduler": "scheduler",
    "multimodal": "multimodal",
    "parallel": "parallelism",
    None: "engine",
}


def parse_str_list(text: str) -> list[str]:
    """'["a", "b"]' (vLLM's JSON form) or 'a,b' -> ["a", "b"]."""
    text = text.strip()
    if text.startswith("["):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            raise argparse.ArgumentTypeError(f"invalid JSON: {e}") from None
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise argparse.ArgumentTypeError("expected a JSON list of strings")
        return value
    return [v.strip() for v in text.split(",") if v.strip()]


def _flatten(values: list[list[str]] | None) -> list[str] | None:
    return None if values is None else [v for vs in values for v in vs]


def _flag_options(f, cli: dict) -> dict:
    """argparse options of one engine argument: from its declared type, default and help."""
    from jaxmm.config import arg_default

    default = arg_default(f)
    kind = str(f.type).replace(" | None", "").strip()
    opts: dict = {"default": default, "help": f.metadata["help"]}
    parsers = {"size": parse_size, "json": parse_json_object, "limit_mm": parse_limit_mm}
    if "type" in cli:
        opts["type"] = parsers[cli["type"]]
    elif kind == "bool":
        opts["action"] = argparse.BooleanOptionalAction  # --foo / --no-foo
    elif kind in ("int", "float", "str"):
        opts["type"] = {"int": int, "float": float, "str": str}[kind]
    elif kind == "dict":
        opts["type"] = parse_json_object
    elif kind.startswith(("tuple[", "list[")):
        opts["nargs"] = "+"
    else:
        raise TypeError(f"no command-line form for {f.name}: {f.type}")
    if kind == "dict" and not default:
        opts["default"] = None  # the config turns None into {}
    if kind == "bool":
        opts["help"] += f" (default: {'on' if default else 'off'})"
    elif default not in (None, {}) and "default" not in opts["help"]:
        opts["help"] += f" (default: {default})"
    for key in ("choices", "metavar"):
        if key in cli:
            opts[key] = cli[key]
    return opts


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """One flag per engine argument declared in jaxmm/config.py, named like vLLM's."""
    from jaxmm.config import ENGINE_ARGS

    groups: dict = {}
    for name, (section, f) in ENGINE_ARGS.items():
        cli = f.metadata["cli"]
        if cli is False:
            continue
        cli = {} if cli is True else cli
        if section not in groups:
            groups[section] = p.add_argument_group(_GROUP_TITLES[section])
        flags = ["--" + name.replace("_", "-"), *cli.get("flags", ())]
        groups[section].add_argument(*flags, dest=name, **_flag_options(f, cli))


def _dict_args() -> dict[str, str]:
    """'--flag-name' -> dest of every JSON-object engine flag (the ones with a dotted form)."""
    from jaxmm.config import ENGINE_ARGS

    return {
        "--" + name.replace("_", "-"): name
        for name, (_, f) in ENGINE_ARGS.items()
        if f.metadata["cli"] is not False and str(f.type).startswith("dict")
    }


def split_dotted_args(argv: list[str]) -> tuple[list[str], dict[str, dict]]:
    """vLLM's dotted form of a JSON-object flag: `--limit-mm-per-prompt.image 2`,
    `--hf-overrides.text_config.num_hidden_layers=2` -> (argv without them, {dest: the
    dict they spell}). A value is read as JSON when it parses (2, true, {...}), else kept
    as a string."""
    flags = _dict_args()
    rest: list[str] = []
    dotted: dict[str, dict] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        head, dot, path = arg.partition(".")
        if not (arg.startswith("--") and dot and head in flags):
            rest.append(arg)
            i += 1
            continue
        path, eq, value = path.partition("=")
        if not eq:
            if i + 1 >= len(argv):
                raise argparse.ArgumentTypeError(f"{arg} needs a value")
            value = argv[i + 1]
            i += 1
        i += 1
        keys = path.split(".")
        if not all(keys):
            raise argparse.ArgumentTypeError(f"{arg}: empty key in the dotted flag")
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        node = dotted.setdefault(flags[head], {})
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise argparse.ArgumentTypeError(f"{arg}: {key!r} was given a value already")
        node[keys[-1]] = parsed
    return rest, dotted


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            value = _merge(out[key], value)
        out[key] = value
    return out


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None = None):
    """`parser.parse_args` with vLLM's dotted flags (`--limit-mm-per-prompt.image 2`) merged
    over the JSON form of the same flag."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        argv, dotted = split_dotted_args(argv)
    except argparse.ArgumentTypeError as e:
        parser.error(str(e))
    args = parser.parse_args(argv)
    for dest, value in dotted.items():
        if not hasattr(args, dest):
            parser.error(f"--{dest.replace('_', '-')}.* is not a flag of {args.command}")
        merged = _merge(getattr(args, dest) or {}, value)
        if dest == "limit_mm_per_prompt":
            try:
                merged = parse_limit_mm(json.dumps(merged))
            except argparse.ArgumentTypeError as e:
                parser.error(f"--limit-mm-per-prompt: {e}")
        setattr(args, dest, merged)
    return args


def llm_kwargs(args, model: str | None) -> dict:
    """LLM() keyword arguments from the parsed engine flags."""
    from jaxmm.config import ENGINE_ARGS

    kwargs = {
        name: getattr(args, name)
        for name, (_, f) in ENGINE_ARGS.items()
        if f.metadata["cli"] is not False and hasattr(args, name)
    }
    kwargs["model"] = model
    return kwargs


def resolve_model(model: str | None) -> str:
    if model:
        return model
    from jaxmm.default_model import default_model_path

    return default_model_path()


def add_sampling_args(p: argparse.ArgumentParser, max_tokens: int) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument(
        "--max-tokens",
        type=int,
        default=max_tokens,
        help=f"most tokens to generate (default: {max_tokens})",
    )
    g.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default: 0)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (default: 1)")
    g.add_argument("--top-k", type=int, default=0, help="0 is off (default: 0)")
    g.add_argument("--sampling-seed", type=int, default=None, help="seed of the sampler")
    g.add_argument("--stop", action="append", help="stop string (repeatable)")


def sampling_params(args):
    from jaxmm.sampling_params import SamplingParams

    return SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.sampling_seed,
        stop=args.stop,
    )


# -- serve -------------------------------------------------------------------------------------


def build_serve_parser(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="run the OpenAI-compatible HTTP server",
        description="Serve MODEL over an OpenAI-compatible HTTP API (/v1/chat/completions, "
        "/v1/completions, /v1/models, ...). Flags are named like `vllm serve`'s.",
    )
    p.add_argument(
        "model",
        nargs="?",
        help="checkpoint directory or .gguf file (default: the embedded SmolLM2-135M-Instruct)",
    )
    p.add_argument("--model", dest="model_flag", help="same as the positional MODEL")
    s = p.add_argument_group("server")
    s.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind (default: 127.0.0.1, this machine only; 0.0.0.0 listens "
        "on all interfaces)",
    )
    s.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    s.add_argument(
        "--api-key",
        action="append",
        default=[os.environ["JAXMM_API_KEY"]] if os.environ.get("JAXMM_API_KEY") else None,
        help="require `Authorization: Bearer KEY` on every endpoint but /health, "
        "/metrics and /version (repeatable; env JAXMM_API_KEY)",
    )
    s.add_argument(
        "--served-model-name",
        nargs="+",
        help="names clients use in `model` (default: MODEL as given)",
    )
    s.add_argument(
        "--chat-template",
        help="Jinja chat template (a file or the template itself) replacing the tokenizer's",
    )
    s.add_argument(
        "--trust-request-chat-template",
        action="store_true",
        help="let requests bring their own chat_template",
    )
    s.add_argument(
        "--max-request-body-bytes",
        type=parse_size,
        default=32 * 2**20,
        help="larger request bodies get 413 (default: 32M)",
    )
    s.add_argument(
        "--warmup",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="compile every shape before accepting requests (default: on)",
    )
    s.add_argument(
        "--engine-process",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run the engine core in a process of its own, so that HTTP work and engine "
        "steps do not share one interpreter lock (default: on for generative models, "
        "multimodal ones included; embedding models run the engine on a thread of the "
        "server process)",
    )
    s.add_argument(
        "--uvicorn-log-level",
        default="info",
        choices=("critical", "error", "warning", "info", "debug", "trace"),
        help="uvicorn's log level (default: info)",
    )
    s.add_argument("--ssl-keyfile", help="TLS private key file (PEM): serve https")
    s.add_argument("--ssl-certfile", help="TLS certificate file (PEM): serve https")
    s.add_argument(
        "--root-path",
        default="",
        help="path prefix the server is reached under behind a reverse proxy, e.g. /llm "
        "(requests may come with or without it)",
    )
    s.add_argument(
        "--response-role",
        default="assistant",
        help="role of the generated message in chat completions (default: assistant)",
    )
    s.add_argument(
        "--disable-log-requests",
        action="store_true",
        help="no log line per request (turns off uvicorn's access log)",
    )
    s.add_argument(
        "--disable-uvicorn-access-log",
        action="store_true",
        help="same as --disable-log-requests",
    )
    s.add_argument(
        "--disable-log-stats",
        action="store_true",
        help="no periodic log line of throughput, running/waiting requests and KV cache use "
        "(logged every 10 s while the engine works)",
    )
    t = p.add_argument_group("tool calls and reasoning")
    t.add_argument(
        "--enable-auto-tool-choice",
        action="store_true",
        help='let the model call tools on its own (tool_choice "auto"); needs --tool-call-parser',
    )
    t.add_argument(
        "--tool-call-parser",
        choices=("hermes", "qwen", "llama3_json", "mistral"),
        help="the model's tool-call format: hermes/qwen (<tool_call> JSON), llama3_json, mistral",
    )
    t.add_argument(
        "--reasoning-parser",
        choices=("deepseek_r1", "qwen3"),
        help="split <think>...</think> into reasoning_content (DeepSeek-R1 or Qwen3 style)",
    )
    c = p.add_argument_group("CORS (off unless --allowed-origins is given)")
    c.add_argument(
        "--allowed-origins",
        nargs="+",
        type=parse_str_list,
        help="origins browsers may call from: '*', or URLs (JSON list or comma-separated)",
    )
    c.add_argument(
        "--allowed-methods",
        nargs="+",
        type=parse_str_list,
        help="HTTP methods allowed cross-origin (default: all)",
    )
    c.add_argument(
        "--allowed-headers",
        nargs="+",
        type=parse_str_list,
        help="request headers allowed cross-origin (default: all)",
    )
    c.add_argument(
        "--allow-credentials",
        action="store_true",
        help="allow cookies and HTTP auth on cross-origin requests",
    )
    add_engine_args(p)
    p.set_defaults(func=cmd_serve)


def served_model_names(args) -> list[str]:
    """vLLM's rule: --served-model-name, else MODEL exactly as given on the command line;
    the embedded default (no MODEL) is served under its model's name."""
    return args.served_model_name or [args.model_flag or args.model or DEFAULT_SERVED_NAME]


def cmd_serve(args) -> int:
    from jaxmm.config import engine_config as check_config
    from jaxmm.multimodal.fetch import MediaPolicy
    from jaxmm.server.app import check_tls_files

    model = resolve_model(args.model_flag or args.model)
    kwargs = llm_kwargs(args, model)
    # refuse bad flags now, before anything loads
    config = check_config(**kwargs, warmup=args.warmup)
    from jaxmm.distributed import wants_distributed

    if wants_distributed(config.parallel):
        # multi-host: process 0 serves; every other one only runs the steps it publishes
        from jaxmm.distributed import follow, resolve_cluster

        addr, n, pid = resolve_cluster(config.parallel)
        kwargs.update(coordinator_address=addr, num_processes=n, process_id=pid)
        config = check_config(**kwargs, warmup=args.warmup)
        if pid != 0:
            logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
            follow(config)
            return 0
    check_tls_files(args.ssl_keyfile, args.ssl_certfile)
    MediaPolicy(
        allowed_local_media_path=config.multimodal.allowed_local_media_path,
        allowed_media_domains=config.multimodal.allowed_media_domains,
    )
    chat_template = load_chat_template(args.chat_template)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if config.model.trust_remote_code:
        logging.getLogger("jaxmm").info(TRUST_REMOTE_CODE_NOTE)
    names = served_model_names(args)
    sampling_defaults = config.model.sampling_defaults()
    if sampling_defaults:
        logging.getLogger("jaxmm").info(
            "sampling defaults from the generation config: %s (--generation-config vllm "
            "ignores them)",
            sampling_defaults,
        )

    from jaxmm.engine.async_engine import AsyncEngine
    from jaxmm.engine.core_process import ProcessEngine
    from jaxmm.engine.pooling_engine import is_pooling_checkpoint
    from jaxmm.llm import LLM, engine_config
    from jaxmm.server.app import build_app, serve

    # generative models (text, vision, audio): the engine core in a process of its own;
    # embedding models (and --runner pooling) keep it on a thread
    own_process = args.engine_process
    if is_pooling_checkpoint(model) or config.model.runner == "pooling":
        own_process = False
    if config.data_parallel_size > 1:
        if own_process is False:
            raise SystemExit(
                "--data-parallel-size runs each replica in an engine process of its own: it "
                "takes generative models, without --no-engine-process"
            )
        from jaxmm.engine.data_parallel import DataParallelEngine

        client = DataParallelEngine(engine_config(**kwargs, warmup=args.warmup))
    elif own_process is not False:
        client = ProcessEngine(engine_config(**kwargs, warmup=args.warmup))
    else:
        llm = LLM(**kwargs, warmup=args.warmup)
        if llm.pooling_engine is not None:  # an embedding model: no generation loop to run
            from jaxmm.engine.pooling_engine import PoolingClient

            client = PoolingClient(llm.pooling_engine)
        else:
            client = AsyncEngine(llm.llm_engine)
    app = build_app(
        client,
        served_model_names=names,
        model_path=model,
        api_keys=args.api_key,
        chat_template=chat_template,
        trust_request_chat_template=args.trust_request_chat_template,
        max_body_bytes=args.max_request_body_bytes,
        shutdown_engine=True,
        response_role=args.response_role,
        default_sampling_params=sampling_defaults,
        allowed_origins=_flatten(args.allowed_origins),
        allowed_methods=_flatten(args.allowed_methods),
        allowed_headers=_flatten(args.allowed_headers),
        allow_credentials=args.allow_credentials,
        root_path=args.root_path,
        log_stats=not args.disable_log_stats,
        tool_call_parser=args.tool_call_parser,
        enable_auto_tool_choice=args.enable_auto_tool_choice,
        reasoning_parser=args.reasoning_parser,
    )
    logging.getLogger("jaxmm").info(
        "serving %s as %s on %s://%s:%d%s (max_model_len=%d)",
        model,
        names,
        "https" if args.ssl_certfile else "http",
        args.host,
        args.port,
        args.root_path.rstrip("/"),
        client.max_model_len,
    )
    serve(
        app,
        host=args.host,
        port=args.port,
        log_level=args.uvicorn_log_level,
        ssl_keyfile=args.ssl_keyfile,
        ssl_certfile=args.ssl_certfile,
        access_log=not (args.disable_log_requests or args.disable_uvicorn_access_log),
    )
    return 0


# -- generate / chat / bench -------------------------------------------------------------------


def build_generate_parser(sub) -> None:
    p = sub.add_parser("generate", help="complete one or more prompts and print the text")
    p.add_argument("prompt", nargs="+", help="prompt text (several: one completion each)")
    p.add_argument("--model", help="checkpoint directory or .gguf file (default: embedded)")
    add_sampling_args(p, max_tokens=128)
    add_engine_args(p)
    p.set_defaults(func=cmd_generate)


def cmd_generate(args) -> int:
    from jaxmm.llm import LLM

    llm = LLM(**llm_kwargs(args, resolve_model(args.model)))
    outs = llm.generate(args.prompt, sampling_params(args), use_tqdm=False)
    for i, out in enumerate(outs):
        if len(outs) > 1:
            print(f"--- {i}")
        print(out.outputs[0].text)
    return 0


def build_chat_parser(sub) -> None:
    p = sub.add_parser(
        "chat",
        help="chat with a model on the terminal",
        description="An interactive chat on stdin/stdout (/reset clears the history, /exit "
        "or end-of-file quits); with --message, one reply and exit.",
    )
    p.add_argument("--model", help="checkpoint directory or .gguf file (default: embedded)")
    p.add_argument("--message", help="send this one message, print the reply and exit")
    p.add_argument("--system", help="system prompt")
    p.add_argument("--chat-template", help="Jinja chat template (file or string)")
    add_sampling_args(p, max_tokens=512)
    add_engine_args(p)
    p.set_defaults(func=cmd_chat)


def cmd_chat(args) -> int:
    from jaxmm.llm import LLM

    llm = LLM(**llm_kwargs(args, resolve_model(args.model)))
    params = sampling_params(args)
    template = load_chat_template(args.chat_template)
    start = [{"role": "system", "content": args.system}] if args.system else []
    history = list(start)

    def reply(text: str) -> str:
        history.append({"role": "user", "content": text})
        out = llm.chat(history, params, use_tqdm=False, chat_template=template)[0]
        answer = out.outputs[0].text
        history.append({"role": "assistant", "content": answer})
        return answer

    if args.message is not None:
        print(reply(args.message))
        return 0
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print(">>> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            history[:] = start
            continue
        print(reply(text), flush=True)
    return 0


def build_bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="offline throughput on random prompts; prints JSON")
    p.add_argument("--model", help="checkpoint directory or .gguf file (default: embedded)")
    p.add_argument("--num-prompts", type=int, default=64, help="(default: 64)")
    p.add_argument("--input-len", type=int, default=128, help="prompt tokens (default: 128)")
    p.add_argument("--output-len", type=int, default=128, help="generated tokens (default: 128)")
    add_engine_args(p)
    p.set_defaults(func=cmd_bench)


def cmd_bench(args) -> int:
    import random
    import time

    import jax

    from jaxmm.llm import LLM
    from jaxmm.sampling_params import SamplingParams

    llm = LLM(**llm_kwargs(args, resolve_model(args.model)), warmup=True)
    vocab = llm.llm_engine.runner.vocab_size
    rng = random.Random(args.seed)
    prompts = [
        {"prompt_token_ids": [rng.randrange(vocab) for _ in range(args.input_len)]}
        for _ in range(args.num_prompts)
    ]
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    llm.generate(prompts[:1], SamplingParams(max_tokens=2, ignore_eos=True), use_tqdm=False)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - t0
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    n_in = args.num_prompts * args.input_len
    print(
        json.dumps(
            {
                "model": llm.llm_engine.config.model.model,
                "device": str(jax.devices()[0].device_kind),
                "jax_version": jax.__version__,
                "num_prompts": args.num_prompts,
                "input_len": args.input_len,
                "output_len": args.output_len,
                "elapsed_s": round(elapsed, 4),
                "requests_per_s": round(args.num_prompts / elapsed, 3),
                "output_tokens_per_s": round(n_out / elapsed, 2),
                "total_tokens_per_s": round((n_in + n_out) / elapsed, 2),
            },
            indent=2,
        )
    )
    return 0


# -- convert -----------------------------------------------------------------------------------


def build_convert_parser(sub) -> None:
    p = sub.add_parser("convert", help="convert a checkpoint from another format")
    kinds = p.add_subparsers(dest="kind", metavar="FORMAT", required=True)
    w = kinds.add_parser("ct2-whisper", help="CTranslate2 (faster-whisper) Whisper -> HF folder")
    w.add_argument("src", help="folder with model.bin, config.json, tokenizer.json")
    w.add_argument("dst", help="output folder")
    w.add_argument(
        "--dtype",
        choices=("float32", "float16"),
        default="float32",
        help="weight dtype written (default: float32)",
    )
    w.set_defaults(func=cmd_convert_ct2_whisper)


def cmd_convert_ct2_whisper(args) -> int:
    from jaxmm.weights.ct2_whisper import convert_ct2_whisper

    convert_ct2_whisper(args.src, args.dst, dtype=args.dtype)
    print(f"wrote {args.dst}")
    return 0


# -- main --------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from jaxmm import __version__

    parser = argparse.ArgumentParser(
        prog="jaxmm",
        description="jaxmm: a multimodal LLM inference engine in JAX.",
    )
    parser.add_argument("--version", action="version", version=f"jaxmm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    build_serve_parser(sub)
    build_generate_parser(sub)
    build_chat_parser(sub)
    build_bench_parser(sub)
    build_convert_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parse_args(parser, argv)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError) as e:  # bad model path, bad flag value
        print(f"jaxmm {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
