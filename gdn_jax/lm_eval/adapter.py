"""The lm-eval model `gdn_jax`: a train.py run directory behind lm-eval's three request types.

    lm = GdnJaxLM(workdir="runs/tiny", dtype="float32", batch_size=8, max_length=8192)
    lm.loglikelihood(requests)          -> [(log p(continuation | context), is greedy)]
    lm.loglikelihood_rolling(requests)  -> [log p(string)]
    lm.generate_until(requests)         -> [continuation text, cut at the task's stop strings]

Strings become ids with the run's own tokenizer and framing (encoding.py), log-likelihoods come
from batched forward passes and, past max_length, the model's recurrence (scoring.py), and
continuations from the on-device generation loop (generation.py). Model arguments, as given to
`--model_args`:

  workdir     train.py run directory (config.json + checkpoints), e.g. one written by import-fla
  step        checkpoint step (default: the latest)
  dtype       compute dtype: bfloat16, float16 or float32 (default: the run's model.dtype)
  batch_size  rows per forward pass / prompts per generation call (default 8)
  max_length  inputs per forward pass (default 8192): longer rows continue through the recurrence;
              its logits take batch_size x max_length x vocab x 4 bytes
  rolling_window  score loglikelihood_rolling strings in lm-eval's rolling windows of this many
              tokens, as its hf backend does with max_length (for comparing with it); default:
              each string is one row, every token read with all of the string before it
  max_gen_toks  new tokens when a task sets none (default 256)
  seed        sampling seed, for tasks that ask for do_sample (default 0)

`device` and `max_batch_size`, which lm-eval passes to every model, are ignored: JAX places the
model on its default device. A request the model cannot serve (chat templates, images or audio,
an unsupported generation option, an empty context without BOS/EOS) raises an error naming its task.
"""

from __future__ import annotations

import inspect
import time
from typing import Callable

from lm_eval.api.model import LM

from gdn_jax.lm_eval.encoding import Encoder, task_error
from gdn_jax.lm_eval.generation import Generator, parse_options
from gdn_jax.lm_eval.scoring import Scorer

DEFAULT_MAX_LENGTH = 8192


def _log(msg: str) -> None:
    print(msg, flush=True)


class Progress:
    """Logs "[gdn_jax] KIND done/total requests  tokens/s  requests/s  elapsed" every `every`
    seconds and at the end. Tokens: the inputs of scored rows, or the prompt and new tokens of
    generated ones; padding is not counted."""

    def __init__(self, log: Callable[[str], None], kind: str, total: int, every: float = 10.0):
        self.log, self.kind, self.total, self.every = log, kind, total, every
        self.t0 = self.last = time.time()

    def __call__(self, done: int, tokens: int) -> None:
        now = time.time()
        if done >= self.total or now - self.last >= self.every:
            dt = max(now - self.t0, 1e-9)
            self.log(f"[gdn_jax] {self.kind} {done}/{self.total} requests  "
                     f"{tokens / dt:,.0f} tokens/s  {done / dt:.2f} requests/s  {dt:.1f}s")
            self.last = now


def _positive_int(name: str, value) -> int:
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"gdn_jax model argument {name} must be a positive integer, got "
                         f"{value!r}") from None
    if n < 1 or str(n) != str(value).strip():
        raise ValueError(f"gdn_jax model argument {name} must be a positive integer, got {value!r}")
    return n


class GdnJaxLM(LM):
    def __init__(self, workdir: str | None = None, step: int | None = None,
                 dtype: str | None = None, batch_size=8, max_length=None, rolling_window=None,
                 max_gen_toks=256, seed: int = 0, device=None, max_batch_size=None, *, run=None,
                 log: Callable[[str], None] = _log):
        """`run` (a gdn_jax.evaluate.loading.Run, for callers that loaded one) or `workdir`."""
        super().__init__()
        del device, max_batch_size  # lm-eval passes them to every model; JAX picks the device
        from gdn_jax.evaluate.loading import load_run
        from gdn_jax.inference import for_inference

        if run is None:
            if workdir is None:
                raise ValueError("the gdn_jax model needs workdir=DIR in --model_args")
            run = load_run(str(workdir), step=None if step is None else int(step))
        self.run, self.log = run, log
        self.batch_size = _positive_int("batch_size", batch_size)
        self.max_length = _positive_int("max_length", max_length or DEFAULT_MAX_LENGTH)
        self.max_gen_toks = _positive_int("max_gen_toks", max_gen_toks)
        self.rolling_window = (None if rolling_window is None
                               else _positive_int("rolling_window", rolling_window))
        self.dtype = dtype or run.cfg.model.dtype
        model = for_inference(run.model, dtype=self.dtype)  # weights cast once, projections fused
        self.encoder = Encoder(run.tokenizer, add_bos=run.cfg.data.add_bos)
        self.scorer = Scorer(model, batch_size=self.batch_size, max_length=self.max_length)
        self.generator = Generator(model, self.encoder, batch_size=self.batch_size, seed=int(seed))
        log(f"[gdn_jax] {run.cfg.model.name} step {run.step}, {run.num_params / 1e6:.2f}M params, "
            f"{self.dtype}, tokenizer {run.tokenizer!r}, batch {self.batch_size}, "
            f"max_length {self.max_length}")

    # ------------------------------------------------------------------------------ requests

    @staticmethod
    def _text_args(request, n: int) -> tuple:
        args = request.args
        if len(args) > n:  # lm-eval appends a dict of images / audio for multimodal tasks
            extra = args[n]
            kinds = ", ".join(extra) if isinstance(extra, dict) else type(extra).__name__
            raise task_error(request.task_name, f"needs {kinds} inputs; the gdn_jax model reads "
                                                f"text only")
        return args[:n]

    def _score(self, kind: str, rows) -> list[tuple[float, bool]]:
        before = self.scorer.long_rows
        result = self.scorer.score(rows, Progress(self.log, kind, len(rows)))
        if self.scorer.long_rows > before:
            self.log(f"[gdn_jax] {kind}: {self.scorer.long_rows - before} request(s) longer than "
                     f"max_length {self.max_length} continued through the recurrence")
        return result

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        rows = []
        for req in requests:
            context, continuation = self._text_args(req, 2)
            rows.append(self.encoder.pair(context, continuation, req.task_name))
        return self._score("loglikelihood", rows)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        rows, owner = [], []
        for k, req in enumerate(requests):
            (text,) = self._text_args(req, 1)
            if self.rolling_window is None:
                windows = [(self.encoder.rolling(text, req.task_name), 1)]
            else:
                windows = self._windows(text, req.task_name)
            rows += windows
            owner += [k] * len(windows)
        total = [0.0] * len(requests)
        for k, (logp, _) in zip(owner, self._score("loglikelihood_rolling", rows)):
            total[k] += logp
        return total

    def _windows(self, text: str, task: str | None) -> list[tuple[list[int], int]]:
        """lm-eval's rolling windows (those of its hf backend) as rows: each token scored once,
        with up to rolling_window - 1 tokens of context."""
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        (prefix,) = self.encoder.prefix(task)
        ids = self.encoder.tokenizer.encode(text)
        pairs = get_rolling_token_windows(ids, prefix, max_seq_len=self.rolling_window,
                                          context_len=1)
        return [(context + scored, len(context))
                for context, scored in map(make_disjoint_window, pairs)]

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        prompts, options = [], []
        for req in requests:
            context, gen_kwargs = self._text_args(req, 2)
            options.append(parse_options(gen_kwargs, req.task_name, self.max_gen_toks))
            prompts.append(self.encoder.prompt(context, req.task_name))
        return self.generator.generate(prompts, options,
                                       Progress(self.log, "generate_until", len(requests)))

    # ------------------------------------------------------------------- lm-eval's extras

    def apply_chat_template(self, chat_history, add_generation_prompt: bool = True) -> str:
        raise task_error(_calling_task(), "--apply_chat_template asks for a chat template, and "
                                          "gdn_jax runs have none (a tokenizer and weights "
                                          "only); run without it")

    @property
    def tokenizer_name(self) -> str:
        return repr(self.run.tokenizer)

    def get_model_info(self) -> dict:
        """Goes into lm-eval's results["config"]."""
        return {"model_name": self.run.cfg.model.name, "model_step": self.run.step,
                "model_num_parameters": self.run.num_params, "model_dtype": self.dtype,
                "tokenizer": self.run.cfg.data.tokenizer, "max_length": self.max_length,
                "rolling_window": self.rolling_window}


def _calling_task() -> str | None:
    """The lm-eval task whose prompt is being built: lm-eval calls apply_chat_template from a
    method of the Task without naming it, so the name is read off the caller's frame."""
    from lm_eval.api.task import Task

    frame = inspect.currentframe()
    while frame is not None:
        obj = frame.f_locals.get("self")
        if isinstance(obj, Task):
            config = getattr(obj, "config", None)
            return getattr(config, "task", None) or type(obj).__name__
        frame = frame.f_back
    return None
