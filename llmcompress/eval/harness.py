"""lm-eval over our own models: an `lm_eval` LM that scores with a plain forward pass, and one call that runs
`lm_eval.simple_evaluate` with the task configs shipped in `llmcompress/eval/tasks` (and a user's folder of task
YAMLs, `tasks.include_path`) on the index.

Tasks come from three places, each checked before a model is loaded: the shipped llmc_* tasks read local files
from `tasks.data_dir` or $LLMC_DATA_DIR; stock lm-eval names (arc_easy, hellaswag, ...) read the Hugging Face hub;
a user's own task is a YAML path (`--tasks my_task.yaml`) or a task in `tasks.include_path`.

The LM takes a loaded (model, tokenizer) pair, so an unquantized model, one whose Linears were swapped for our
QuantLinear, and a distilled student all go through the same code: whatever `model(input_ids).logits` returns
is what gets scored.
"""

from __future__ import annotations

import logging
import os
import re
from contextlib import ExitStack
from pathlib import Path
from typing import Optional
from unittest import mock

import torch
import torch.nn.functional as F

from ..errors import UserError
from ..progress import Reporter
from .perplexity import model_context

TASKS_DIR = Path(__file__).parent / "tasks"
DATA_DIR_ENV = "LLMC_DATA_DIR"
HUB_PROBE_TIMEOUT_S = 5  # offline, datasets otherwise retries for minutes before it gives up
MAX_LENGTH_CAP = 4096  # an 8k-context 135M model does not need 8k-token batches to score short MC requests


def _lm_base():
    from lm_eval.api.model import TemplateLM

    return TemplateLM


def data_dir(configured: Optional[str] = None) -> Optional[Path]:
    """Where the llmc_* tasks read their files: tasks.data_dir, else $LLMC_DATA_DIR, else None (not set)."""
    value = configured or os.environ.get(DATA_DIR_ENV)
    return Path(value).expanduser().resolve() if value else None


class LlmcLM(_lm_base()):
    """lm-eval's three request types on a causal LM, batched, scored exactly as a direct forward pass would."""

    def __init__(self, model, tokenizer, *, batch_size: int = 8, max_length: Optional[int] = None,
                 max_gen_toks: int = 256, reporter: Optional[Reporter] = None):
        super().__init__()
        self.model, self.tokenizer = model, tokenizer
        self.batch_size = batch_size
        self._max_length = max_length or min(model_context(model) or 2048, MAX_LENGTH_CAP)
        self.max_gen_toks = max_gen_toks
        self.reporter = reporter or Reporter()
        self._device = next(model.parameters()).device

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        # the token an empty context conditions on: BOS where the tokenizer has one, like lm-eval's HFLM
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.eot_token_id

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def max_length(self) -> int:
        return self._max_length

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string, add_special_tokens=bool(add_special_tokens))

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens,
                                     clean_up_tokenization_spaces=False)

    # ---------------------------------------------------------------- log-likelihood

    @torch.no_grad()
    def score(self, pairs: list[tuple[list[int], list[int]]], description: str = "loglikelihood"
              ) -> list[tuple[float, bool]]:
        """(sum log p(continuation | context), continuation is the greedy output) for token-id pairs."""
        results: list[Optional[tuple[float, bool]]] = [None] * len(pairs)
        # longest first: equal lengths share a batch and padding stays small (as lm-eval's HFLM orders them)
        order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
        batches = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        for batch in self.reporter.track(batches, total=len(batches), description=description):
            seqs, spans = [], []
            for i in batch:
                ctx, cont = pairs[i]
                # the model sees context+continuation minus the last token, left-truncated to max_length
                full = (ctx + cont)[-(self.max_length + 1):]
                seqs.append(full[:-1])
                spans.append(len(cont))
            width = max(len(s) for s in seqs)
            # right padding: a causal model's logits at real positions never see the pad tokens after them
            ids = torch.full((len(seqs), width), pad, dtype=torch.long)
            for row, s in enumerate(seqs):
                ids[row, :len(s)] = torch.tensor(s, dtype=torch.long)
            logits = self.model(ids.to(self._device)).logits
            for row, i in enumerate(batch):
                n, cont = len(seqs[row]), pairs[i][1]
                logprobs = F.log_softmax(logits[row, n - spans[row]:n].float(), dim=-1)
                target = torch.tensor(cont[-spans[row]:], device=logprobs.device)
                ll = logprobs.gather(-1, target[:, None]).sum().item()
                greedy = bool((logprobs.argmax(-1) == target).all())
                results[i] = (ll, greedy)
        return results  # type: ignore[return-value]

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        # progress is shown by our reporter's bar over batches, not by lm-eval's tokenizing bar
        return super().loglikelihood(requests, disable_tqdm=True)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        out = self.score([(ctx, cont) for _, ctx, cont in requests])
        for (key, _, _), answer in zip(requests, out):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval import utils

        pairs, owner = [], []
        for r, req in enumerate(requests):
            # every token is scored once; the first conditions on the prefix token (lm-eval's definition)
            for ctx, cont in map(utils.make_disjoint_window, utils.get_rolling_token_windows(
                    token_list=self.tok_encode(req.args[0]), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                pairs.append((ctx, cont))
                owner.append(r)
        totals = [0.0] * len(requests)
        for r, (ll, _) in zip(owner, self.score(pairs, "loglikelihood_rolling")):
            totals[r] += ll
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", (req.args[0],), total)
        return totals

    # ---------------------------------------------------------------- generation

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        eos = (self.tokenizer.decode([self.eot_token_id], clean_up_tokenization_spaces=False)
               if self.eot_token_id is not None else None)
        results: list[Optional[str]] = [None] * len(requests)
        # requests with the same generation settings run together, longest prompt first
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(repr(sorted(req.args[1].items())), []).append(i)
        batches = []
        for idx in groups.values():
            idx.sort(key=lambda i: -len(requests[i].args[0]))
            batches += [idx[j:j + self.batch_size] for j in range(0, len(idx), self.batch_size)]
        for batch in self.reporter.track(batches, total=len(batches), description="generate_until"):
            kwargs = dict(requests[batch[0]].args[1])
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            if eos and eos not in until:
                until.append(eos)
            max_gen = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            do_sample = bool(kwargs.pop("do_sample", False))
            temperature = float(kwargs.pop("temperature", 0.0))
            if temperature == 0.0:
                do_sample = False
            texts = [self._fit_prompt(requests[i].args[0], self.max_length - max_gen) for i in batch]
            outs = self._generate(texts, max_gen, until, do_sample, temperature)
            for i, text in zip(batch, outs):
                for stop in until:
                    if stop:
                        text = text.split(stop)[0]
                results[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return results  # type: ignore[return-value]

    def _fit_prompt(self, prompt: str, max_tokens: int) -> str:
        """The prompt itself, or its last max_tokens tokens when it would not leave room to generate."""
        ids = self.tok_encode(prompt)
        if len(ids) <= max_tokens:
            return prompt
        return self.tokenizer.decode(ids[-max_tokens:], clean_up_tokenization_spaces=False)

    def _generate(self, prompts: list[str], max_new_tokens: int, until: list[str], do_sample: bool,
                  temperature: float) -> list[str]:
        tok = self.tokenizer
        side = tok.padding_side
        tok.padding_side = "left"  # generation appends on the right, so prompts must end at the same column
        try:
            enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(self._device)
        finally:
            tok.padding_side = side
        gen_kwargs = dict(max_new_tokens=max_new_tokens, do_sample=do_sample,
                          pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else self.eot_token_id)
        if do_sample:
            gen_kwargs["temperature"] = temperature
        else:
            gen_kwargs.update(temperature=None, top_p=None, top_k=None)
        stops = [s for s in until if s]
        if stops:
            gen_kwargs.update(stop_strings=stops, tokenizer=tok)
        out = self.model.generate(**enc, **gen_kwargs)
        return [tok.decode(row[enc["input_ids"].shape[1]:], skip_special_tokens=False,
                           clean_up_tokenization_spaces=False) for row in out]


def local_tasks() -> list[str]:
    """Names of the task configs shipped in llmcompress/eval/tasks."""
    return sorted(p.stem for p in TASKS_DIR.glob("*.yaml"))


def _is_yaml(name: str) -> bool:
    return name.endswith((".yaml", ".yml"))


def _included_tasks(include_path: Optional[str]) -> set[str]:
    """Task, group and tag names defined by the YAML files under include_path (lm-eval's own index reads them
    again; this only tells a user's task from a stock one)."""
    if not include_path:
        return set()
    names = set()
    for f in Path(include_path).expanduser().rglob("*.y*ml"):
        names |= set(re.findall(r"^(?:task|group|tag):\s*['\"]?([\w.\-]+)", f.read_text(errors="replace"), re.M))
    return names


def stock_tasks(names: list[str], include_path: Optional[str] = None) -> list[str]:
    """The names that are neither shipped llmc_* tasks, YAML paths nor tasks of include_path: lm-eval's own."""
    mine = _included_tasks(include_path)
    return [n for n in names if not n.startswith("llmc_") and not _is_yaml(n) and n not in mine]


def _hub_unreachable() -> Optional[str]:
    """None if the Hugging Face hub answers (or the user asked for offline mode, where datasets reads its cache),
    else why not, in a few words."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    if constants.HF_HUB_OFFLINE or os.environ.get("HF_DATASETS_OFFLINE", "").lower() in ("1", "true", "yes"):
        return None
    try:
        get_session().head(constants.ENDPOINT, timeout=HUB_PROBE_TIMEOUT_S)
    except Exception as e:  # DNS, refused, timeout, proxy: all mean the same to the user
        return e.__class__.__name__
    return None


def check_tasks(names: list[str], data_dir_path: Optional[str] = None, include_path: Optional[str] = None) -> None:
    """Fail at once, in one line, on a task that cannot run: a misspelt llmc_* name, a llmc_* task without its
    data folder or files, a task YAML or include folder that does not exist, a stock task with the hub offline."""
    from .tasks.utils import missing_files

    bad = [n for n in names if n.startswith("llmc_") and n not in local_tasks()]
    if bad:
        raise UserError(f"tasks.names: unknown {', '.join(bad)}; shipped local tasks: {', '.join(local_tasks())}")
    if include_path and not Path(include_path).expanduser().is_dir():
        raise UserError(f"tasks.include_path: {include_path} is not a folder")
    for n in names:
        if _is_yaml(n) and not Path(n).expanduser().is_file():
            raise UserError(f"tasks.names: task file {n} does not exist")
    local = [n for n in names if n.startswith("llmc_")]
    if local:
        ddir = data_dir(data_dir_path)
        if ddir is None:
            raise UserError(f"tasks {', '.join(local)} read local files: set tasks.data_dir or ${DATA_DIR_ENV} to "
                            f"the folder that holds them, or name the stock lm-eval task "
                            f"({', '.join(n.removeprefix('llmc_') for n in local)}), which reads the hub")
        if not ddir.is_dir():
            raise UserError(f"tasks.data_dir / ${DATA_DIR_ENV}: {ddir} is not a folder (the llmc_* tasks read "
                            f"their files from it)")
        for n in local:
            missing = missing_files(n, ddir)
            if missing:
                raise UserError(f"task {n}: {missing[0]} not found (set tasks.data_dir or ${DATA_DIR_ENV} to the "
                                f"folder that holds it)")
    stock = stock_tasks(names, include_path)
    if stock:
        why = _hub_unreachable()
        if why:
            local_twins = [f"llmc_{n}" for n in stock if f"llmc_{n}" in local_tasks()]
            hint = (f"use {', '.join(local_twins)} with tasks.data_dir, " if local_twins else "") + \
                "set HF_HUB_OFFLINE=1 to read datasets already cached, or pass a task YAML"
            raise UserError(f"tasks {', '.join(stock)}: stock lm-eval tasks read the Hugging Face hub, which is "
                            f"unreachable ({why}); {hint}")


def run_tasks(model, tokenizer, names: list[str], *, limit: Optional[int] = None,
              num_fewshot: Optional[int] = None, batch_size: int = 8, bootstrap_iters: int = 1000,
              max_gen_toks: int = 256, data_dir_path: Optional[str] = None, include_path: Optional[str] = None,
              seed: int = 0, reporter: Optional[Reporter] = None) -> dict:
    """Run lm-eval tasks (names as check_tasks accepts them); returns {task: {metric: value, metric_stderr: value,
    ...}} with lm-eval's metric names (the ',none' filter suffix kept only where a task has several filters, as
    for gsm8k), and under "_meta" what each task read."""
    import lm_eval
    from lm_eval import evaluator
    from lm_eval.tasks import TaskManager

    import datasets

    # lm-eval warns about every custom_dataset task and datasets draws a bar per split: noise on a terminal
    # whose progress is our reporter's
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    ddir = data_dir(data_dir_path)
    includes = [str(TASKS_DIR)] + ([str(Path(include_path).expanduser())] if include_path else [])
    # the stock index holds thousands of YAML files; scan it only when a stock task is asked for
    tm = TaskManager(include_path=includes, include_defaults=bool(stock_tasks(names, include_path)),
                     metadata={"llmc_data_dir": str(ddir or "")})
    lm = LlmcLM(model, tokenizer, batch_size=batch_size, max_gen_toks=max_gen_toks, reporter=reporter)
    try:
        with ExitStack() as stack:
            # lm-eval records the git hash of the working directory (printing "fatal: not a git repository"
            # outside one) and torch's environment report: neither describes the model, and the manifest
            # already records the versions that matter
            stack.enter_context(mock.patch.object(evaluator, "get_git_commit_hash", lambda: None))
            stack.enter_context(mock.patch.object(evaluator, "add_env_info", lambda storage: None))
            out = evaluator.simple_evaluate(model=lm, tasks=list(names), num_fewshot=num_fewshot, limit=limit,
                                            task_manager=tm, bootstrap_iters=bootstrap_iters, log_samples=False,
                                            random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                                            fewshot_random_seed=seed)
    except KeyError as e:
        if "not a registered" not in str(e):
            raise
        raise UserError(f"tasks: {e.args[0]} (shipped local tasks: {', '.join(local_tasks())}; stock lm-eval "
                        f"task names need the hub)") from None
    except (ValueError, FileNotFoundError, ConnectionError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
        raise UserError(f"tasks {', '.join(names)}: {msg}") from None
    finally:
        if bars:
            datasets.enable_progress_bars()
    return {task: _clean_metrics(metrics) for task, metrics in out["results"].items()} | {
        "_meta": {"n_samples": out.get("n-samples", {}), "versions": out.get("versions", {}),
                  "n_shot": out.get("n-shot", {}), "lm_eval_version": lm_eval.__version__
                  if hasattr(lm_eval, "__version__") else None,
                  "data": {task: task_data(c) for task, c in out.get("configs", {}).items()}}}


def task_data(config: dict) -> str:
    """What a task scored, in words: a shipped task's own `metadata.data` line, else its dataset and split."""
    described = (config.get("metadata") or {}).get("data")
    if described:
        return described
    source = " ".join(str(config[k]) for k in ("dataset_path", "dataset_name") if config.get(k))
    files = (config.get("dataset_kwargs") or {}).get("data_files")
    if files:
        source += f" {files}"
    split = next((f"{config[k]} split" for k in ("test_split", "validation_split") if config.get(k)), "")
    return ", ".join(p for p in (source or "custom dataset", split) if p)


def _clean_metrics(metrics: dict) -> dict:
    """lm-eval keys are 'metric,filter'; keep the filter only where it is not the default 'none'."""
    out = {}
    for key, value in metrics.items():
        if key in ("alias", "sample_len") or not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        metric, _, filt = key.partition(",")
        out[metric if filt in ("", "none") else f"{metric},{filt}"] = float(value)
    return out
