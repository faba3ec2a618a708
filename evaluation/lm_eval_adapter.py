r"""`DiffusionMoeLM`: a masked-diffusion MoE model as an lm-evaluation-harness (lm_eval 0.4) model.

Registered as `diffusion_moe`. The three request types:

* `generate_until`: the library's batched block-parallel `generate()` on left-padded
  prompts (one call per batch of requests that share their generation settings). The
  decoded answer is always cut at the first of the task's `until` strings or EOS, as
  lm_eval's `HFLM` post-processes it (`postprocess_generated_text`). Each answer also stops
  decoding early, after the block in which its decoded text first contains a stop sequence:
  a stopping criterion that decodes the answer tokens only (never the prompt), so it works
  with any tokenizer that decodes. Transformers' `stop_strings` (`StopStringCriteria`) is
  not used: it cannot be built for tokenizers whose vocabulary it cannot index (a
  word-level tokenizer raises `ValueError: substring not found`), and it matches the stop
  sequence against prompt + answer, so a stop sequence that starts in the prompt (a chat
  prompt ending in "\n", `until=["\n\n"]`, an answer starting with "\n") would end the
  answer after its first token. Denoising forwards and tokens per forward are accumulated
  in `generation_stats`.
* `loglikelihood`: a Monte Carlo estimate of the ELBO of log p(continuation | context), the
  estimator of LLaDA's evaluation. Sample j masks l_j of the L continuation tokens
  (a uniformly random subset; l_j = ceil(u_j L) with u_j stratified over (0, 1), so l_j is
  uniform on 1..L), runs the model on context + partially masked continuation, and scores
  (L / l_j) * sum of log p(token) over the masked tokens; the estimate is the mean over the
  `mc_num` samples. Masking an exact count, rather than each token with probability t and
  weighting 1/t, keeps every sample's weight at most L: with at least one token forced masked,
  the 1/t form has unbounded weights (a one-token continuation would score
  log p / t with t ~ U(0, 1), whose mean diverges). Here a one-token continuation gets its
  exact log-probability with the token masked, whatever `mc_num`. The noise of a request is
  drawn from a generator seeded by `seed` and the request's tokens, so a request scores the
  same in every call, batch and order. `is_greedy` says whether every continuation token is
  the model's top prediction (mask token excluded) when the whole continuation is masked:
  one extra forward per request (`check_greedy=False` skips it and reports False).
* `loglikelihood_rolling`: the same ELBO for the whole text (the first window is
  conditioned on the BOS token, or EOS when the tokenizer has no BOS), in disjoint windows
  of at most `max_length` tokens, summed (total nats, as lm_eval's perplexity metrics need).

Text never becomes the mask token. All three encode text with `tok_encode`, which encodes
the mask token's text (e.g. "<|mask|>" in a document) as ordinary text, the way
Transformers' `apply_chat_template(..., sanitize_control_tokens=True)` encodes control
tokens in user input: the text around it is encoded as usual and the mask token's text
with `split_special_tokens=True`. A tokenizer that yields the mask id even then (a
word-level vocabulary holding the word) raises a ValueError naming the text: the model
would read a mask, not the text, and score or answer something else than was asked.

MC samples of one or several requests are rows of one forward, `batch_size` rows at a time.
Log-probabilities are computed from the masked positions' hidden states in chunks, so no
[rows, length, vocab] logits are ever built (LLaDA2's vocabulary has 157k entries).

Built on `TemplateLM`, not `HFLM`. `TemplateLM` gives the request plumbing (context /
continuation encoding and splitting, empty contexts, `create_from_arg_string` with lm_eval's
argument parsing); lm_eval's helpers do batching (`Collator`), generation settings
(`normalize_gen_kwargs`, `handle_stop_sequences`, `postprocess_generated_text`), prompt
truncation (`truncate_tokens`), rolling windows and string arguments (`handle_arg_string`);
the tokenizer pads. Subclassing `HFLM` would bring autoregressive assumptions that are
wrong here: its `_loglikelihood_tokens` scores a continuation with one shifted (next-token)
forward, where a masked diffusion model's logits at a position predict that position and
the likelihood needs masking; its stop criterion (`MultiTokenEOSCriteria`) decodes only the
last len(stop) + 2 tokens, as if one token were added per step, so it misses a stop early
in a block that diffusion decides at once, and it answers for the whole batch, not per row;
its `__init__` loads `AutoModelForCausalLM` / seq2seq backends and probes `batch_size=auto`
with autoregressive forwards. What remains here is diffusion-specific: the Monte Carlo ELBO
and block generation.
"""

import hashlib
import logging
import sys

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForMaskedLM, AutoTokenizer, StoppingCriteria, StoppingCriteriaList

import lm_eval.models  # noqa: F401  -- fills lm_eval's model registry first, so that "hf", "dummy"... still resolve
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import (
    Collator,
    handle_stop_sequences,
    normalize_gen_kwargs,
    postprocess_generated_text,
    truncate_tokens,
)
from lm_eval.models.utils_hf import get_dtype
from lm_eval.utils import get_rolling_token_windows, handle_arg_string, make_disjoint_window

from ..generation.generation_config_diffusion import SUPPORTED_FIELDS, DiffusionGenerationConfig

logger = logging.getLogger(__name__)

MODEL_NAME = "diffusion_moe"
# generate() settings that model_args may set as defaults; the adapter sets these ones per request
_PER_REQUEST_FIELDS = {
    "max_length": "the answer length comes from the task's `max_gen_toks` (or the `max_gen_toks` model arg)",
    "max_new_tokens": "the answer length comes from the task's `max_gen_toks` (or the `max_gen_toks` model arg)",
    "stop_strings": "stop sequences come from the task's `until` (or --gen_kwargs until=...)",
    "return_dict_in_generate": "the adapter always asks for the dict output",
    "num_return_sequences": "lm_eval asks for repeats through the task's `repeats`",
    "output_history": "not used by the adapter",
    "transformers_version": "not a setting",
}
GENERATION_SETTINGS = frozenset(SUPPORTED_FIELDS) - set(_PER_REQUEST_FIELDS)
# generate() settings a task's generation_kwargs / --gen_kwargs may not set (max_new_tokens and the
# other length aliases are lm_eval's `max_gen_toks`, which normalize_gen_kwargs has already taken)
_NOT_IN_GEN_KWARGS = {
    "max_length": "lm_eval's answer length is `max_gen_toks`",
    "stop_strings": "stop sequences are `until`",
    "return_dict_in_generate": "the adapter always asks for the dict output",
    "num_return_sequences": "lm_eval asks for repeats through the task's `repeats`",
    "output_history": "not used by the adapter",
}
# fp32 log-probabilities of at most this many bytes exist at once when scoring
_CHUNK_BYTES = 256 * 2**20


@register_model(MODEL_NAME)
class DiffusionMoeLM(TemplateLM):
    """lm_eval model for `DiffusionMoeForMaskedLM` checkpoints (`--model diffusion_moe`).

    Args (lm_eval `--model_args`, all optional but `pretrained`):
        pretrained: a folder written by `save_pretrained` (or the converter), or a hub id.
        tokenizer: tokenizer folder or id (default: `pretrained`).
        device: torch device; lm_eval's CLI default "cuda:0" falls back to "cpu" (with a
            warning) when CUDA is unavailable. Default: CUDA when available, else CPU.
        dtype: "auto" (the checkpoint's) or a torch floating dtype's name ("float32", "bfloat16",
            "float16", "float64", "half", ...), as lm_eval's `hf` model takes it.
        batch_size: sequences per forward: prompts per `generate()` call, ELBO rows (Monte
            Carlo samples of one or several requests) per scoring forward. An int or a
            numeric string; lm_eval's "auto" is not supported.
        max_batch_size: an upper bound on `batch_size` (None: no bound).
        mc_num: Monte Carlo samples per loglikelihood request (and per rolling window).
        seed: seed of the Monte Carlo noise (mixed with each request's tokens).
        check_greedy: compute `is_greedy` with one extra forward per request (else False).
        max_length: longest sequence the model sees (default: `max_position_embeddings`);
            longer contexts are cut on the left, rolling texts are split into windows.
        max_gen_toks: answer length when a task sets none (lm_eval's default 256).
        trust_remote_code: passed to Transformers' `from_pretrained` (model, config, tokenizer).
            This process has imported diffusion_moe, whose registration with the Auto classes
            makes Transformers build the installed model classes either way; the flag matters
            for a tokenizer with custom code.
        generation defaults: any `generate()` setting, e.g. `block_length`, `steps`,
            `threshold`, `editing_threshold`, `max_post_steps`, `remasking`, `do_sample`,
            `temperature`, `top_p`, `use_cache`, `eos_early_stop`. They apply to every
            generate_until request unless the task's `generation_kwargs` or `--gen_kwargs`
            set the same key (those win; lm_eval's defaults set `do_sample` and
            `temperature` for tasks without generation_kwargs). Unset ones come from the
            checkpoint's `generation_config.json`.
        config overrides: any other field of the checkpoint's config, applied when loading,
            e.g. `router_type=expert_choice,capacity_schedule=linear_reverse` (retrofitting).
    Any other name raises a ValueError.

    `generation_stats` accumulates over generate_until calls: `requests`, `generate_calls`,
    `denoising_forwards` (the batched forwards generate() ran), `generated_tokens` (answer
    tokens before padding), `tokens_per_forward` (generate()'s per-sample statistic, averaged
    over requests) and `tokens_per_batch_forward` (generated_tokens / denoising_forwards).
    Each generate_until call logs them at INFO and prints one summary line to stderr.
    Multi-process (data-parallel) evaluation is not supported: rank 0 of 1.
    """

    backend = "causal"  # context + continuation are tokenized together, then split

    def __init__(self, pretrained: str | None = None, tokenizer: str | None = None, device: str | None = None,
                 dtype: str | torch.dtype = "auto", batch_size: int | str = 1, max_batch_size: int | str | None = None,
                 mc_num: int = 32, seed: int = 0, check_greedy: bool = True, max_length: int | None = None,
                 max_gen_toks: int = 256, trust_remote_code: bool = False, **kwargs):
        super().__init__()
        if pretrained is None or not str(pretrained).strip():
            raise ValueError(f"{MODEL_NAME}: `pretrained` (a checkpoint folder or id) is required.")
        self.batch_size = _batch_size(batch_size, max_batch_size)
        self.mc_num = _int(mc_num, "mc_num", minimum=1)
        self.seed = _int(seed, "seed")
        self.check_greedy = _bool(check_greedy, "check_greedy")
        self.max_gen_toks = _int(max_gen_toks, "max_gen_toks", minimum=1)
        trust_remote_code = _bool(trust_remote_code, "trust_remote_code")
        torch_dtype = _dtype(dtype)
        self._device = _device(device)

        config = AutoConfig.from_pretrained(str(pretrained), trust_remote_code=trust_remote_code)
        if getattr(config, "model_type", None) != MODEL_NAME:
            raise ValueError(
                f"{MODEL_NAME}: {pretrained!r} is a {getattr(config, 'model_type', None)!r} checkpoint, not a "
                f"diffusion_moe one; convert it first (e.g. `diffusion-moe convert llada2 SRC DST`)."
            )
        generation, overrides, unknown, misplaced = {}, {}, [], []
        config_fields = set(config.to_dict())
        for name, value in kwargs.items():
            if name in GENERATION_SETTINGS:
                generation[name] = value
            elif name in _PER_REQUEST_FIELDS:
                misplaced.append(f"{name} ({_PER_REQUEST_FIELDS[name]})")
            elif name in config_fields:
                overrides[name] = value
            else:
                unknown.append(name)
        if misplaced or unknown:
            raise ValueError(
                f"{MODEL_NAME}: unsupported model_args: {sorted(unknown + misplaced)}. Accepted: pretrained, "
                "tokenizer, device, dtype, batch_size, max_batch_size, mc_num, seed, check_greedy, max_length, "
                "max_gen_toks, trust_remote_code, generate() settings "
                f"({', '.join(sorted(GENERATION_SETTINGS - {'transformers_version'}))}) and fields of the "
                "checkpoint's config (overrides applied when loading)."
            )

        # everything is checked before the weights load
        if overrides:  # the config validates them (ValueError naming the field)
            config = AutoConfig.from_pretrained(str(pretrained), trust_remote_code=trust_remote_code, **overrides)
        if config.mask_token_id is None:
            raise ValueError(f"{MODEL_NAME}: the checkpoint's config sets no `mask_token_id`.")
        self.max_length = _int(max_length, "max_length", minimum=1) if max_length is not None else int(
            config.max_position_embeddings
        )
        if self.max_length < 2:
            raise ValueError(f"{MODEL_NAME}: `max_length` must be at least 2; got {self.max_length}.")
        # validated as generate() will merge them (from_dict, then update): a bad value raises here
        _generation_config(str(pretrained), config).update(**generation)

        self.model = AutoModelForMaskedLM.from_pretrained(
            str(pretrained), config=config, dtype=torch_dtype, trust_remote_code=trust_remote_code
        ).to(self._device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(
            str(tokenizer or pretrained), trust_remote_code=trust_remote_code
        )
        self.tokenizer.padding_side = "left"
        self.mask_token_id = config.mask_token_id
        if self.tokenizer.pad_token_id is None:
            # the tokenizer pads prompts and ELBO rows (padding is never attended); like lm_eval's
            # configure_pad_token without its last resort of adding a token the embeddings lack
            self.tokenizer.pad_token_id = self.eot_token_id
        self.generation_defaults = generation
        self.generation_stats = _empty_stats()  # accumulated over generate_until calls
        self._sample_tokens_per_forward = 0.0
        self.pretrained = str(pretrained)
        logger.info(
            f"{MODEL_NAME}: loaded {pretrained} ({self.model.config.attention_layout}, router "
            f"{self.model.config.router_type}, {self.model.dtype}) on {self._device}; batch_size={self.batch_size}, "
            f"mc_num={self.mc_num}, seed={self.seed}, max_length={self.max_length}, generation defaults {generation}"
        )

    # ----------------------------------------------------------------- lm_eval hooks
    @property
    def eot_token_id(self) -> int:
        eos = self.tokenizer.eos_token_id
        if eos is None:
            eos = self.model.config.eos_token_id
            eos = eos[0] if isinstance(eos, (list, tuple)) else eos
        return eos

    @property
    def prefix_token_id(self) -> int:
        """What an empty context is replaced with: BOS, or EOS when the tokenizer has none."""
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.eot_token_id

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def get_model_info(self) -> dict:
        return {"pretrained": self.pretrained, "model_dtype": str(self.model.dtype),
                "attention_layout": self.model.config.attention_layout, "router_type": self.model.config.router_type}

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(
            chat_history, tokenize=False, add_generation_prompt=add_generation_prompt,
            continue_final_message=not add_generation_prompt,
        )

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """`string`'s token ids (no special tokens unless asked for), never holding the mask id:
        the mask token's text is encoded as ordinary text (see the module docstring)."""
        ids = self.tokenizer.encode(string, add_special_tokens=bool(add_special_tokens))
        if self.mask_token_id in ids:
            ids = self._encode_mask_text_as_text(string, ids, bool(add_special_tokens))
        return ids

    def _encode_mask_text_as_text(self, string: str, ids: list[int], add_special_tokens: bool) -> list[int]:
        """`string` with each occurrence of the mask token's text encoded as plain text, as
        Transformers' `sanitize_control_tokens` encodes control tokens in user input: the text
        between occurrences is encoded as usual (added tokens split the text there anyway), each
        occurrence with `split_special_tokens=True`; pieces after the first are encoded after a
        newline that is then dropped, so that a SentencePiece tokenizer adds no prefix space."""
        mask_text = self.tokenizer.convert_ids_to_tokens(self.mask_token_id)
        pieces = string.split(mask_text) if mask_text else [string]
        plain = self._encode_piece(pieces[0], first=True)
        for piece in pieces[1:]:
            plain += self._encode_piece(mask_text, as_text=True)
            if piece:
                plain += self._encode_piece(piece)
        if add_special_tokens:  # the tokenizer's own special tokens around the text
            bare = self.tokenizer.encode(string, add_special_tokens=False)
            at = next((k for k in range(len(ids) - len(bare) + 1) if ids[k : k + len(bare)] == bare), None)
            if at is None:
                raise ValueError(f"{MODEL_NAME}: cannot tell the special tokens the tokenizer adds to {string!r}.")
            plain = ids[:at] + plain + ids[at + len(bare):]
        if self.mask_token_id in plain:
            at = string.find(mask_text) if mask_text else -1
            where = string[max(at - 30, 0) : at + len(mask_text) + 30] if at >= 0 else string[:80]
            raise ValueError(
                f"{MODEL_NAME}: the text contains the mask token's text {mask_text!r} (...{where!r}...), which this "
                f"tokenizer encodes as the mask token (id {self.mask_token_id}) even as plain text: the model would "
                "read a mask there, not the text, and answer or score something else than was asked. Remove or "
                "replace that text in the task's documents."
            )
        return plain

    def _encode_piece(self, text: str, as_text: bool = False, first: bool = False) -> list[int]:
        def encode(piece):
            return self.tokenizer.encode(piece, add_special_tokens=False, split_special_tokens=as_text)

        if first:
            return encode(text)
        newline = encode("\n")
        ids = encode("\n" + text)
        return ids[len(newline):] if ids[: len(newline)] == newline else encode(text)

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=False)

    # ----------------------------------------------------------------- loglikelihood
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """requests: [((context, continuation), context_tokens, continuation_tokens)] (TemplateLM's form)."""
        pairs = []
        for _, context, continuation in requests:
            if len(continuation) > self.max_length - 1:
                raise ValueError(
                    f"{MODEL_NAME}: a continuation of {len(continuation)} tokens does not fit max_length="
                    f"{self.max_length} with at least one context token."
                )
            pairs.append((list(context)[-(self.max_length - len(continuation)):], list(continuation)))
        scores = self.elbo(pairs, check_greedy=self.check_greedy, disable_tqdm=disable_tqdm)
        for (strings, _, _), result in zip(requests, scores):
            self.cache_hook.add_partial("loglikelihood", strings, result)
        return scores

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for index, request in enumerate(requests):
            (text,) = request.args
            tokens = self.tok_encode(text)
            for window in get_rolling_token_windows(tokens, self.prefix_token_id, self.max_length - 1, 1):
                windows.append(make_disjoint_window(window))
                owner.append(index)
        totals = [0.0] * len(requests)
        for index, (score, _) in zip(owner, self.elbo(windows, check_greedy=False, disable_tqdm=disable_tqdm)):
            totals[index] += score
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    @torch.no_grad()
    def elbo(self, pairs: list[tuple[list[int], list[int]]], check_greedy: bool = True,
             disable_tqdm: bool = True) -> list[tuple[float, bool]]:
        """Monte Carlo ELBO of log p(continuation | context) for token lists, with `is_greedy`
        (False when `check_greedy` is off). See the module docstring for the estimator."""
        rows = []  # (pair index, masked continuation offsets, weight, is the greedy check)
        for k, (context, continuation) in enumerate(pairs):
            L = len(continuation)
            if L == 0:
                continue
            generator = torch.Generator().manual_seed(self._request_seed(context, continuation))
            u = (torch.arange(self.mc_num, dtype=torch.float64) + torch.rand((), generator=generator,
                                                                               dtype=torch.float64)) / self.mc_num
            counts = torch.ceil(u * L).long().clamp(1, L)
            for count in counts.tolist():
                masked = torch.randperm(L, generator=generator)[:count]
                rows.append((k, masked, L / (count * self.mc_num), False))
            if check_greedy:
                rows.append((k, torch.arange(L), 0.0, True))
        scores = [0.0] * len(pairs)
        greedy = [bool(check_greedy)] * len(pairs)
        order = sorted(range(len(rows)), key=lambda r: -len(pairs[rows[r][0]][0]) - len(pairs[rows[r][0]][1]))
        batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        for batch in tqdm(batches, desc="ELBO forwards", disable=disable_tqdm):
            logprobs, correct = self._score_rows([(pairs[rows[r][0]], rows[r][1]) for r in batch])
            for r, logprob, ok in zip(batch, logprobs, correct):
                k, _, weight, is_check = rows[r]
                if is_check:
                    greedy[k] = ok
                else:
                    scores[k] += weight * logprob
        return list(zip(scores, greedy))

    def _score_rows(self, rows) -> tuple[list[float], list[bool]]:
        """One forward over rows ((context, continuation), masked continuation offsets), left-padded.
        Returns each row's sum of log p(target) over its masked tokens and whether all were argmax."""
        ids, attention_mask = self._left_pad([context + continuation for (context, continuation), _ in rows])
        width = ids.shape[1]
        row_of = torch.cat([torch.full((len(masked),), b, dtype=torch.long) for b, (_, masked) in enumerate(rows)])
        column = torch.cat([width - len(continuation) + masked for (_, continuation), masked in rows])
        targets = ids[row_of, column].to(self.device)
        ids[row_of, column] = self.mask_token_id
        attention_mask = None if attention_mask.all() else attention_mask.to(self.device)
        hidden = self.model.base_model(input_ids=ids.to(self.device), attention_mask=attention_mask).last_hidden_state
        hidden = hidden[row_of.to(self.device), column.to(self.device)]
        head = self.model.get_output_embeddings()
        logprob, hit = [], []
        step = max(1, _CHUNK_BYTES // (4 * self.model.config.vocab_size))
        for s in range(0, hidden.shape[0], step):
            logits = head(hidden[s : s + step])
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
            logprob.append(F.log_softmax(logits, dim=-1).gather(-1, targets[s : s + step, None])[:, 0].cpu())
            logits[:, self.mask_token_id] = float("-inf")  # never a prediction (as in generate())
            hit.append((logits.argmax(-1) == targets[s : s + step]).cpu())
        logprob = torch.cat(logprob).double() if logprob else torch.zeros(0, dtype=torch.float64)
        hit = torch.cat(hit) if hit else torch.zeros(0, dtype=torch.bool)
        sums = torch.zeros(len(rows), dtype=torch.float64).index_add_(0, row_of, logprob)
        misses = torch.zeros(len(rows), dtype=torch.long).index_add_(0, row_of, (~hit).long())
        return sums.tolist(), (misses == 0).tolist()

    def _left_pad(self, sequences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token lists left-padded by the tokenizer: ids [B, T] and the attention mask, on the CPU."""
        batch = self.tokenizer.pad({"input_ids": sequences}, padding_side="left", return_attention_mask=True,
                                   return_tensors="pt")
        return batch["input_ids"], batch["attention_mask"]

    def _request_seed(self, context: list[int], continuation: list[int]) -> int:
        digest = hashlib.blake2b(digest_size=8)
        digest.update(str(self.seed).encode())
        digest.update(torch.tensor(context + [-1] + continuation, dtype=torch.long).numpy().tobytes())
        return int.from_bytes(digest.digest(), "little") & (2**63 - 1)

    # ----------------------------------------------------------------- generation
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        if not requests:
            return []
        before, before_sample = dict(self.generation_stats), self._sample_tokens_per_forward
        collator = Collator(
            [request.args for request in requests],
            sort_fn=lambda args: (-len(self.tok_encode(args[0])), args[0]),
            group_by="gen_kwargs",
            group_fn=lambda args: args[1],
        )
        texts = []
        progress = tqdm(total=len(requests), desc="generate_until", disable=disable_tqdm)
        for chunk in collator.get_batched(n=self.batch_size):
            contexts = [context for context, _ in chunk]
            answers = self.generate_texts(contexts, chunk[0][1])
            for (context, gen_kwargs), answer in zip(chunk, answers):
                self.cache_hook.add_partial("generate_until", (context, gen_kwargs), answer)
            texts.extend(answers)
            progress.update(len(chunk))
        progress.close()
        call = {key: self.generation_stats[key] - before[key] for key in ("requests", "denoising_forwards",
                                                                          "generated_tokens")}
        per_sample = (self._sample_tokens_per_forward - before_sample) / max(call["requests"], 1)
        line = (
            f"{MODEL_NAME}: generate_until: {call['requests']} requests, {call['denoising_forwards']} denoising "
            f"forwards, {call['generated_tokens']} answer tokens; tokens per forward: {per_sample:.3f} per sample, "
            f"{call['generated_tokens'] / max(call['denoising_forwards'], 1):.3f} per batched forward"
        )
        logger.info(line)
        print(line, file=sys.stderr, flush=True)
        return collator.get_original(texts)

    @torch.no_grad()
    def generate_texts(self, contexts: list[str], gen_kwargs: dict) -> list[str]:
        """Answers to `contexts` under one request's lm_eval `gen_kwargs` (one batched generate() call)."""
        settings = normalize_gen_kwargs({**self.generation_defaults, **gen_kwargs}, self.max_gen_toks)
        misplaced = sorted(f"{name} ({why})" for name, why in _NOT_IN_GEN_KWARGS.items() if name in settings)
        if misplaced:
            raise ValueError(f"{MODEL_NAME}: generation kwargs the adapter sets itself: {misplaced}.")
        until = settings.pop("until")
        if not all(isinstance(stop, str) for stop in until):
            raise ValueError(f"{MODEL_NAME}: `until` must be strings (stop sequences); got {until!r}.")
        until = [stop for stop in until if stop]  # lm_eval ignores empty stop sequences
        max_new_tokens = settings.pop("max_gen_toks")
        cut_at = handle_stop_sequences(list(until), eos=self.tok_decode([self.eot_token_id]))
        room = self.max_length - max_new_tokens
        encoded = [self.tok_encode(context) for context in contexts]
        if room > 0 and any(len(tokens) > room for tokens in encoded):
            logger.warning(f"{MODEL_NAME}: prompts longer than max_length - max_gen_toks = {room} are cut on the left.")
            encoded = [truncate_tokens(tokens, room, side="left") for tokens in encoded]
        encoded = [tokens or [self.prefix_token_id] for tokens in encoded]  # generate() needs a prompt token
        input_ids, attention_mask = self._left_pad(encoded)
        width = input_ids.shape[1]
        criteria = StoppingCriteriaList([_AnswerStopCriteria(until, self.tok_decode, width, self.mask_token_id)]
                                        if until else [])
        output = self.model.generate(
            input_ids.to(self.device), attention_mask=attention_mask.to(self.device), stopping_criteria=criteria,
            max_new_tokens=max_new_tokens, return_dict_in_generate=True, **settings,
        )
        answer_pad = _answer_pad_id(self.model.generation_config, settings, self.mask_token_id)
        answers, lengths = [], []
        for row in output.sequences[:, width:].tolist():
            while row and row[-1] == answer_pad:  # generate() pads after EOS / a stop / early end
                row.pop()
            lengths.append(len(row))
            answers.append(postprocess_generated_text(self.tok_decode(row), cut_at, None))
        self._record(output, lengths)
        return answers

    def _record(self, output, lengths: list[int]) -> None:
        stats = self.generation_stats
        stats["requests"] += len(lengths)
        stats["generate_calls"] += 1
        stats["denoising_forwards"] += int(output.num_forward_passes)
        stats["generated_tokens"] += sum(lengths)
        self._sample_tokens_per_forward += float(output.tokens_per_forward.sum())
        stats["tokens_per_forward"] = self._sample_tokens_per_forward / stats["requests"]
        stats["tokens_per_batch_forward"] = stats["generated_tokens"] / max(stats["denoising_forwards"], 1)
        logger.info(
            f"{MODEL_NAME}: generate() of {len(lengths)} prompts: {output.num_forward_passes} denoising forwards, "
            f"{sum(lengths)} answer tokens, tokens per forward per sample {output.tokens_per_forward.tolist()}"
        )


# --------------------------------------------------------------------- command line
def lm_eval_argv(argv: list[str]) -> list[str]:
    """lm_eval's argv for `diffusion-moe eval ARGS`: ARGS as given, plus `--model diffusion_moe`
    when ARGS run an evaluation without naming a model (lm_eval's own default is "hf")."""
    argv = list(argv)
    if argv and argv[0] in ("ls", "validate", "-h", "--help"):
        return argv
    named = any(a == "--model" or a.startswith("--model=") for a in argv)
    if named or not argv or argv == ["run"]:
        return argv
    at = 1 if argv[0] == "run" else 0
    return argv[:at] + ["--model", MODEL_NAME] + argv[at:]


def run_lm_eval_cli(argv: list[str] | None = None, prog: str = "diffusion-moe eval") -> int:
    """Run lm_eval's command line (`lm_eval ARGS`) in this process, with `diffusion_moe` registered."""
    from lm_eval.__main__ import cli_evaluate

    argv = lm_eval_argv(sys.argv[1:] if argv is None else argv)
    saved = sys.argv
    sys.argv = [prog, *argv]
    try:
        cli_evaluate()
    except SystemExit as exit_:  # argparse errors / --help
        return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    finally:
        sys.argv = saved
    return 0


# --------------------------------------------------------------------- helpers
class _AnswerStopCriteria(StoppingCriteria):
    """Per row, whether the decoded answer contains one of `stops`: the answer is what follows
    the (left-padded) prompt width, up to its first undecided (mask) position; the prompt is
    never looked at, as in lm_eval's `MultiTokenEOSCriteria`. generate() checks it after every
    block, on the answer decided so far. Only decoding is needed, so any tokenizer works."""

    def __init__(self, stops: list[str], decode, prompt_width: int, mask_token_id: int):
        self.stops, self.decode = list(stops), decode
        self.prompt_width, self.mask_token_id = prompt_width, mask_token_id

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        hits = []
        for row in input_ids[:, self.prompt_width:].tolist():
            if self.mask_token_id in row:
                row = row[: row.index(self.mask_token_id)]
            text = self.decode(row)
            hits.append(any(stop in text for stop in self.stops))
        return torch.tensor(hits, dtype=torch.bool, device=input_ids.device)


def _empty_stats() -> dict:
    return {"requests": 0, "generate_calls": 0, "denoising_forwards": 0, "generated_tokens": 0,
            "tokens_per_forward": 0.0, "tokens_per_batch_forward": 0.0}


def _answer_pad_id(generation_config, settings: dict, mask_token_id: int) -> int:
    """The id generate() writes after an answer's end (its pad id, else the first EOS, else the mask)."""
    pad = settings.get("pad_token_id", generation_config.pad_token_id)
    if pad is not None:
        return pad
    eos = settings.get("eos_token_id", generation_config.eos_token_id)
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    return eos[0] if eos else mask_token_id


def _generation_config(pretrained: str, config) -> DiffusionGenerationConfig:
    """The checkpoint's generation defaults, as generate() will see them."""
    try:
        saved = DiffusionGenerationConfig.from_pretrained(pretrained)
    except (OSError, ValueError):  # none (or a bad one, which loading ignores): built from the model config
        saved = DiffusionGenerationConfig.from_model_config(config)
    return DiffusionGenerationConfig.from_dict(saved.to_dict())


def _device(device) -> torch.device:
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(str(device))
    if device.type == "cuda" and not torch.cuda.is_available():
        logger.warning(f"{MODEL_NAME}: device {str(device)!r} requested but CUDA is unavailable; using the CPU.")
        return torch.device("cpu")
    return device


def _dtype(dtype):
    """lm_eval's `hf` reading of `dtype` (`get_dtype`: "auto" or a torch attribute's name), floating only."""
    resolved = None
    if isinstance(dtype, torch.dtype):
        resolved = dtype
    elif isinstance(dtype, str) and (dtype == "auto" or isinstance(getattr(torch, dtype, None), torch.dtype)):
        resolved = get_dtype(dtype)
    if resolved == "auto" or (isinstance(resolved, torch.dtype) and resolved.is_floating_point):
        return resolved
    raise ValueError(
        f"{MODEL_NAME}: `dtype` must be 'auto' or a floating torch dtype's name (float32, bfloat16, float16, "
        f"float64, half, ...); got {dtype!r}."
    )


def _batch_size(batch_size, max_batch_size) -> int:
    if isinstance(batch_size, str) and batch_size.strip().startswith("auto"):
        raise ValueError(
            f"{MODEL_NAME}: batch_size={batch_size!r} is not supported (no automatic batch size search); pass a "
            "number, e.g. --batch_size 8."
        )
    size = _int(batch_size, "batch_size", minimum=1)
    if max_batch_size is not None:
        size = min(size, _int(max_batch_size, "max_batch_size", minimum=1))
    return size


def _parsed(value):
    """A string argument read the way lm_eval reads --model_args values (`handle_arg_string`)."""
    return handle_arg_string(value) if isinstance(value, str) else value


def _int(value, name: str, minimum: int | None = None) -> int:
    number = _parsed(value)
    if isinstance(number, float) and number.is_integer():
        number = int(number)
    if isinstance(number, bool) or not isinstance(number, int) or (minimum is not None and number < minimum):
        kind = "an integer" if minimum is None else f"an integer >= {minimum}"
        raise ValueError(f"{MODEL_NAME}: `{name}` must be {kind}; got {value!r}.")
    return number


def _bool(value, name: str) -> bool:
    flag = _parsed(value)
    if isinstance(flag, int) and flag in (0, 1):  # True, False, 0, 1, "true", "False", "1"...
        return bool(flag)
    raise ValueError(f"{MODEL_NAME}: `{name}` must be true or false; got {value!r}.")


__all__ = ["DiffusionMoeLM", "GENERATION_SETTINGS", "lm_eval_argv", "run_lm_eval_cli"]
