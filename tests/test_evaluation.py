"""lm-evaluation-harness adapter (`diffusion_moe.evaluation`): the registered `diffusion_moe`
model run by `lm_eval.simple_evaluate` on tiny local tasks, generation against the library's
own generate(), the Monte Carlo ELBO against exact log-probabilities, rolling windows,
argument checks and the `diffusion-moe eval` command line; stop sequences and the mask token's
text with the BPE tokenizer and with a word-level one. Offline: tiny models and tokenizers are
built here, tasks read JSON files written to tmp."""

import json
import math
import textwrap

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window  # noqa: E402

from diffusion_moe import DiffusionMoeConfig, DiffusionMoeForMaskedLM  # noqa: E402
from diffusion_moe.evaluation import DiffusionMoeLM, lm_eval_argv  # noqa: E402
from diffusion_moe.training import train_tokenizer  # noqa: E402

LAYOUTS = ("block_causal", "bidirectional")
DOCUMENTS = [
    "Q: 2+2=\nA: 4\n\nQ: 3+3=\nA: 6\n\nThe sky is blue. The grass is green. Roses are red.",
    "One plus one is two. Two plus two is four. The capital of France is Paris.",
    "Some text for perplexity: the quick brown fox jumps over the lazy dog, again and again.",
] * 4


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The models are tiny: a second thread only adds synchronisation (and stalls on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(DOCUMENTS, vocab_size=320)


@pytest.fixture(scope="module")
def checkpoints(tokenizer, tmp_path_factory):
    """{layout: folder} with a tiny sharpened model (confident predictions) and the tokenizer."""
    folders = {}
    for layout in LAYOUTS:
        torch.manual_seed(4)  # a seed whose untrained model answers more than one repeated token
        config = DiffusionMoeConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, num_experts=8, num_experts_per_tok=2,
            moe_intermediate_size=16, mask_token_id=tokenizer.mask_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, attention_layout=layout, block_size=4, max_position_embeddings=128,
        )
        model = DiffusionMoeForMaskedLM(config).eval()
        with torch.no_grad():
            model.lm_head.weight.mul_(8.0)
        folder = tmp_path_factory.mktemp(layout)
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        folders[layout] = str(folder)
    return folders


WORDS = "the sky is blue green red grass roses are and one two plus four . , Q A :".split()


@pytest.fixture(scope="module")
def word_level_checkpoint(tmp_path_factory):
    """A tiny model with a word-level tokenizer (whitespace-split words, decoded joined by spaces)
    that has no pad token: a vocabulary Transformers' StopStringCriteria cannot index."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {word: i for i, word in enumerate(["<eos>", "<mask>", "<unk>", *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", mask_token="<mask>",
                                        unk_token="<unk>")
    torch.manual_seed(2)  # a seed whose untrained model answers several different words
    config = DiffusionMoeConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
        mask_token_id=tokenizer.mask_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=None,
        attention_layout="block_causal", block_size=4, max_position_embeddings=128,
    )
    model = DiffusionMoeForMaskedLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    folder = tmp_path_factory.mktemp("word_level")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    """A folder of task YAMLs (generate_until, multiple_choice, loglikelihood_rolling) over JSON files."""
    root = tmp_path_factory.mktemp("tasks")
    rows = {
        "gen": [{"question": "2+2=", "answer": "4"}, {"question": "3+3=", "answer": "6"},
                {"question": "The sky is", "answer": "blue"}],
        "mc": [{"question": "The sky is", "choices": ["blue", "green", "red"], "label": 0},
               {"question": "Two plus two is", "choices": ["four", "five"], "label": 0}],
        "ppl": [{"text": "The quick brown fox jumps over the lazy dog."}, {"text": "Roses are red, the sky is blue."}],
    }
    for name, docs in rows.items():
        (root / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))

    def data(name):  # dataset_kwargs: absolute paths (relative ones resolve against the CWD)
        return f"  data_files: {{test: {root / (name + '.jsonl')}}}\n  cache_dir: {root / 'cache'}"

    (root / "tiny_gen.yaml").write_text(textwrap.dedent("""\
        task: tiny_gen
        dataset_path: json
        dataset_kwargs:
        {data}
        test_split: test
        output_type: generate_until
        doc_to_text: "Q: {{{{question}}}}\\nA:"
        doc_to_target: "{{{{answer}}}}"
        generation_kwargs: {{until: ["\\n"], max_gen_toks: 8, do_sample: false, steps: 2, block_length: 4}}
        metric_list:
          - {{metric: exact_match, aggregation: mean, higher_is_better: true, ignore_case: true}}
        filter_list:
          - name: strip
            filter: [{{function: remove_whitespace}}, {{function: take_first}}]
        metadata: {{version: 1.0}}
        """).format(data=data("gen")))
    (root / "tiny_mc.yaml").write_text(textwrap.dedent("""\
        task: tiny_mc
        dataset_path: json
        dataset_kwargs:
        {data}
        test_split: test
        output_type: multiple_choice
        doc_to_text: "{{{{question}}}}"
        doc_to_choice: "{{{{choices}}}}"
        doc_to_target: label
        metric_list:
          - {{metric: acc, aggregation: mean, higher_is_better: true}}
          - {{metric: acc_norm, aggregation: mean, higher_is_better: true}}
        metadata: {{version: 1.0}}
        """).format(data=data("mc")))
    (root / "tiny_ppl.yaml").write_text(textwrap.dedent("""\
        task: tiny_ppl
        dataset_path: json
        dataset_kwargs:
        {data}
        test_split: test
        output_type: loglikelihood_rolling
        doc_to_text: ""
        doc_to_target: "{{{{text}}}}"
        metric_list:
          - {{metric: word_perplexity, aggregation: weighted_perplexity, higher_is_better: false}}
          - {{metric: byte_perplexity, aggregation: weighted_perplexity, higher_is_better: false}}
          - {{metric: bits_per_byte, aggregation: bits_per_byte, higher_is_better: false}}
        metadata: {{version: 1.0}}
        """).format(data=data("ppl")))
    return str(root)


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def evaluate(tasks_dir, task_names, **kwargs):
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=tasks_dir, include_defaults=False)
    return lm_eval.simple_evaluate(tasks=task_names, task_manager=manager, bootstrap_iters=0, **kwargs)


def ll_request(context, continuation, idx=0):
    return Instance("loglikelihood", {}, (context, continuation), idx)


def gen_request(context, gen_kwargs, idx=0):
    return Instance("generate_until", {}, (context, dict(gen_kwargs)), idx)


def library_answer(lm, context, stop, **settings):
    """The library's own generate() for one prompt, decoded and cut at the stop sequence and EOS."""
    ids = torch.tensor([lm.tokenizer.encode(context, add_special_tokens=False)])
    out = lm.model.generate(ids, tokenizer=lm.tokenizer, stop_strings=[stop] if stop else None,
                            return_dict_in_generate=True, **settings)
    answer = out.sequences[0, ids.shape[1]:].tolist()
    while answer and answer[-1] == lm.tokenizer.pad_token_id:
        answer.pop()
    text = lm.tokenizer.decode(answer, skip_special_tokens=False)
    for cut in ([stop] if stop else []) + [lm.tokenizer.eos_token]:
        text = text.split(cut)[0]
    return text, out


# ---------------------------------------------------------------- lm_eval end to end
def test_simple_evaluate_runs_generation_multiple_choice_and_rolling_tasks(checkpoints, tasks):
    model_args = dict(pretrained=checkpoints["block_causal"], mc_num=4, seed=3)
    results = evaluate(tasks, ["tiny_gen", "tiny_mc", "tiny_ppl"], model="diffusion_moe", model_args=model_args,
                       device="cpu", batch_size=4, log_samples=True)
    metrics = results["results"]
    # exact match by hand: the stripped answer equals the target ignoring case, averaged over the 3 questions
    matches = [s["resps"][0][0].strip().lower() == s["doc"]["answer"].lower() for s in results["samples"]["tiny_gen"]]
    assert len(matches) == 3
    assert metrics["tiny_gen"]["exact_match,strip"] == pytest.approx(sum(matches) / 3)
    assert {"acc,none", "acc_norm,none"} <= set(metrics["tiny_mc"])
    for name in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
        assert math.isfinite(metrics["tiny_ppl"][name]) and metrics["tiny_ppl"][name] > 0
    assert results["config"]["model"] == "diffusion_moe"
    # what the evaluator got is what the adapter gives when called directly with the same arguments
    lm = DiffusionMoeLM(**model_args, batch_size=1)
    for sample in results["samples"]["tiny_mc"]:
        assert len(sample["arguments"]) == len(sample["doc"]["choices"])  # one request per choice
        for args, (response,) in zip(sample["arguments"], sample["resps"]):
            (expected,) = lm.loglikelihood([ll_request(*args)])
            assert response[0] == pytest.approx(expected[0], abs=1e-4) and response[1] == expected[1]
    for sample in results["samples"]["tiny_gen"]:
        ((context, gen_kwargs),) = sample["arguments"]
        assert context.startswith("Q: ") and gen_kwargs["steps"] == 2  # the YAML's settings reach generate_until
        assert sample["resps"][0][0] == lm.generate_until([gen_request(context, gen_kwargs)])[0]
        assert "\n" not in sample["resps"][0][0]


def test_chat_template_is_applied_to_prompts(checkpoints, tasks, tokenizer):
    lm = DiffusionMoeLM(pretrained=checkpoints["bidirectional"])
    messages = [{"role": "user", "content": "Q: 2+2=\nA:"}]
    assert lm.apply_chat_template(messages) == "<|user|>\nQ: 2+2=\nA:\n<|assistant|>\n"
    assert lm.chat_template(True) == tokenizer.chat_template and lm.tokenizer_name
    results = evaluate(tasks, ["tiny_gen"], model=lm, apply_chat_template=True, limit=2, log_samples=True,
                       gen_kwargs="max_gen_toks=4")
    ((context, gen_kwargs),) = results["samples"]["tiny_gen"][0]["arguments"]
    assert context.startswith("<|user|>\n") and context.endswith("<|assistant|>\n")
    assert gen_kwargs["max_gen_toks"] == 4


def test_diffusion_moe_eval_runs_lm_eval_cli_with_the_model_registered(checkpoints, tasks, monkeypatch, capsys):
    """`diffusion-moe eval ARGS` in-process. lm_eval's CLI always indexes its ~15k built-in tasks
    (about 13 s), which has no flag, so the test narrows its TaskManager to --include_path."""
    import lm_eval.tasks
    from diffusion_moe.cli import main

    class LocalTasksOnly(lm_eval.tasks.TaskManager):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "include_defaults": False})

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", LocalTasksOnly)
    code = main(["eval", "--model_args", f"pretrained={checkpoints['block_causal']},mc_num=2", "--tasks", "tiny_mc",
                 "--include_path", tasks, "--limit", "1", "--batch_size", "8"])  # no --device: "cuda:0" -> CPU
    out = capsys.readouterr().out
    assert code == 0
    assert "diffusion_moe" in out and "|tiny_mc|" in out.replace(" ", "")


def test_lm_eval_argv_adds_the_model_only_where_lm_eval_would_default_to_hf():
    args = ["--model_args", "pretrained=/x", "--tasks", "t"]
    assert lm_eval_argv(args) == ["--model", "diffusion_moe", *args]
    assert lm_eval_argv(["run", *args]) == ["run", "--model", "diffusion_moe", *args]
    assert lm_eval_argv(["--model", "hf", *args]) == ["--model", "hf", *args]
    assert lm_eval_argv(["--model=dummy", *args]) == ["--model=dummy", *args]
    for untouched in (["ls", "tasks"], ["validate", "--tasks", "t"], ["--help"], []):
        assert lm_eval_argv(untouched) == untouched


# ---------------------------------------------------------------- generate_until
@pytest.mark.parametrize("layout", LAYOUTS)
def test_generate_until_is_the_library_generate_cut_at_the_stop_sequence(checkpoints, layout):
    lm = DiffusionMoeLM(pretrained=checkpoints[layout], batch_size=4, steps=2)  # a model_args generation default
    eos = lm.tokenizer.eos_token_id
    settings = dict(max_new_tokens=12, block_length=4, steps=2, suppress_tokens=[eos])
    contexts = ["Q: 2+2=\nA:", "The sky is", "One plus one is two. Two plus"]
    # a stop sequence that an unstopped answer first completes at answer token p, 1 <= p < 8 (a later
    # block remains): the text of one of its tokens, absent from the text before it
    chosen = None
    for context in contexts:
        free_text, free = library_answer(lm, context, None, **settings)
        answer = free.sequences[0, -12:].tolist()
        for p in range(1, 8):
            prefix, piece = lm.tokenizer.decode(answer[:p]), lm.tokenizer.decode(answer[p : p + 1])
            if piece.strip() and piece.isascii() and (prefix + piece).find(piece) == len(prefix):
                chosen = context, piece, prefix, free
                break
        if chosen:
            break
    assert chosen, "the tiny model's answers leave no stop sequence to test with"
    context, stop, prefix, free = chosen
    gen_kwargs = {"until": [stop], "max_gen_toks": 12, "do_sample": False, "block_length": 4,
                  "suppress_tokens": [eos]}  # `steps` comes from model_args

    texts = lm.generate_until([gen_request(c, gen_kwargs, i) for i, c in enumerate(contexts)])
    for other, text in zip(contexts, texts):
        assert text == library_answer(lm, other, stop, **settings)[0]
        assert stop not in text
    assert texts[contexts.index(context)] == prefix != ""

    # the stop ends decoding early: fewer denoising forwards than without it
    before = lm.generation_stats["denoising_forwards"]
    lm.generate_until([gen_request(context, gen_kwargs)])
    stopped = lm.generation_stats["denoising_forwards"] - before
    lm.generate_until([gen_request(context, {**gen_kwargs, "until": []})])
    unstopped = lm.generation_stats["denoising_forwards"] - before - stopped
    assert stopped < unstopped == free.num_forward_passes
    stats = lm.generation_stats
    assert stats["requests"] == 5 and stats["generate_calls"] == 3
    assert 0 < stats["tokens_per_forward"] <= stats["tokens_per_batch_forward"]


def test_generate_until_rejects_unknown_generation_settings(checkpoints):
    lm = DiffusionMoeLM(pretrained=checkpoints["bidirectional"])
    with pytest.raises(ValueError, match="num_beams"):
        lm.generate_until([gen_request("The sky is", {"until": ["\n"], "max_gen_toks": 4, "num_beams": 2})])
    # settings the adapter sets itself: num_return_sequences would hand one prompt's samples to the next
    for name, value in (("num_return_sequences", 2), ("stop_strings", ["\n"]), ("max_length", 64)):
        with pytest.raises(ValueError, match=f"adapter sets itself.*{name}"):
            lm.generate_until([gen_request("The sky is", {"until": ["\n"], "max_gen_toks": 4, name: value})])
    with pytest.raises(ValueError, match="`until` must be strings"):  # was silently dropped: no stop at all
        lm.generate_until([gen_request("The sky is", {"until": ["\n", 7], "max_gen_toks": 4})])


def first_stop_in(lm, answer, limit):
    """(stop, text before it): the text of answer token p, 1 <= p < limit, for the first p whose
    text occurs there first (so the decoded answer is cut right before it)."""
    for p in range(1, limit):
        prefix = lm.tok_decode(answer[:p])
        piece = lm.tok_decode(answer[: p + 1])[len(prefix):]  # token p's text, as decoding joins it
        if piece.strip() and (prefix + piece).find(piece) == len(prefix):
            return piece, prefix
    return None


def test_generate_until_stops_at_the_stop_sequence_with_a_word_level_tokenizer(word_level_checkpoint):
    """Transformers' StopStringCriteria cannot index a word-level vocabulary (`ValueError: substring not
    found`); the adapter cuts the decoded answers at the stop sequence and still stops decoding early."""
    lm = DiffusionMoeLM(pretrained=word_level_checkpoint, batch_size=2)
    eos = lm.tokenizer.eos_token_id
    settings = dict(max_new_tokens=12, block_length=4, steps=4, suppress_tokens=[eos])
    contexts = ["the sky is", "roses are red and"]
    free = []
    for context in contexts:
        ids = torch.tensor([lm.tok_encode(context)])
        out = lm.model.generate(ids, return_dict_in_generate=True, **settings)
        free.append((out.sequences[0, ids.shape[1]:].tolist(), out.num_forward_passes))
    found = first_stop_in(lm, free[0][0], 8)  # completed before the last block: decoding ends early
    assert found, "the tiny model's answer leaves no stop sequence to test with"
    stop, prefix = found
    gen_kwargs = {"until": [stop], "max_gen_toks": 12, "do_sample": False, "block_length": 4, "steps": 4,
                  "suppress_tokens": [eos]}
    texts = lm.generate_until([gen_request(c, gen_kwargs, i) for i, c in enumerate(contexts)])
    assert texts[0] == prefix != "" and stop not in texts[0]
    assert texts[1] == lm.tok_decode(free[1][0]).split(stop)[0]  # each answer is cut at its own stop
    before = lm.generation_stats["denoising_forwards"]
    lm.generate_until([gen_request(contexts[0], gen_kwargs)])
    assert lm.generation_stats["denoising_forwards"] - before < free[0][1]
    assert lm.tokenizer.pad_token_id == eos  # it had none: the prompts were padded with EOS


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_stop_sequence_that_starts_in_the_prompt_does_not_end_the_answer(checkpoints, layout):
    """lm_eval looks for stop sequences in the answer only. Matched against prompt + answer (as
    Transformers' stop_strings does), a stop made of the prompt's last character and the answer's
    first token (a chat prompt ending in "\n", until ["\n\n"], an answer starting with "\n")
    would end the answer after one token."""
    lm = DiffusionMoeLM(pretrained=checkpoints[layout], batch_size=4)
    eos = lm.tokenizer.eos_token_id
    settings = dict(max_new_tokens=8, block_length=4, steps=2, suppress_tokens=[eos])
    checked = 0
    for context in ["Q: 2+2=\nA:\n", "The sky is", "One plus one is two. Two plus", "Roses are red,"]:
        free_text, free = library_answer(lm, context, None, **settings)
        first = lm.tok_decode(free.sequences[0, -8:].tolist()[:1])
        stop = context[-1] + first
        if not first.strip() or stop in free_text:
            continue
        gen_kwargs = {"until": [stop], "max_gen_toks": 8, "do_sample": False, "block_length": 4, "steps": 2,
                      "suppress_tokens": [eos]}
        assert lm.generate_until([gen_request(context, gen_kwargs)]) == [free_text] and len(free_text) > len(first)
        checked += 1
    assert checked >= 2


# ---------------------------------------------------------------- loglikelihood
def exact_logprobs(lm, context, continuation, masked):
    """log p(continuation[i]) for i in `masked`, from one forward with those positions masked."""
    ids = torch.tensor([context + continuation])
    for i in masked:
        ids[0, len(context) + i] = lm.mask_token_id
    with torch.no_grad():
        logits = lm.model(ids).logits[0, len(context):].float()
    return [logits[i].log_softmax(-1)[continuation[i]].item() for i in masked], logits


@pytest.mark.parametrize("layout", LAYOUTS)
def test_one_token_continuation_scores_its_exact_log_probability(checkpoints, layout):
    """With one token the only mask count is 1 (weight 1): every sample is the exact log p(y | context)."""
    lm = DiffusionMoeLM(pretrained=checkpoints[layout], mc_num=5, batch_size=3)
    context = lm.tok_encode("The sky is")
    _, logits = exact_logprobs(lm, context, [0], [0])
    logits[0, lm.mask_token_id] = float("-inf")
    best, other = logits[0].argmax().item(), logits[0].argmin().item()
    for token, greedy in ((best, True), (other, False)):
        (exact,), _ = exact_logprobs(lm, context, [token], [0])
        (score, is_greedy), = lm.elbo([(context, [token])])
        assert score == pytest.approx(exact, abs=1e-5) and is_greedy is greedy
    assert lm.elbo([(context, [best])])[0][0] > lm.elbo([(context, [other])])[0][0]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_two_token_estimate_is_unbiased_with_the_elbo_weights(checkpoints, layout):
    """L = 2: stratified counts give half the samples 1 mask (weight 2), half 2 masks (weight 1), so the
    estimate is mean(a_i) over the drawn i plus (b_1 + b_2) / 2, whose expectation is the ELBO
    (a_i: token i masked alone, b_i: both masked)."""
    mc = 256
    lm = DiffusionMoeLM(pretrained=checkpoints[layout], mc_num=mc, batch_size=64, check_greedy=False)
    context, continuation = lm.tok_encode("Two plus two is"), lm.tok_encode(" four. The")[:2]
    assert len(continuation) == 2
    (a1,), _ = exact_logprobs(lm, context, continuation, [0])
    (a2,), _ = exact_logprobs(lm, context, continuation, [1])
    (b1, b2), _ = exact_logprobs(lm, context, continuation, [0, 1])
    elbo = (a1 + a2) / 2 + (b1 + b2) / 2
    (score, greedy), = lm.elbo([(context, continuation)], check_greedy=False)
    sigma = abs(a1 - a2) / 2 / math.sqrt(mc / 2)  # the only noise: which token the one-mask samples hide
    assert abs(score - elbo) <= 5 * sigma + 1e-5 and greedy is False
    assert min(a1, a2) + (b1 + b2) / 2 - 1e-5 <= score <= max(a1, a2) + (b1 + b2) / 2 + 1e-5


@pytest.mark.parametrize("layout, overrides", [("block_causal", {}), ("block_causal", {"router_type": "expert_choice"}),
                                               ("bidirectional", {})])
def test_loglikelihood_is_seeded_and_batching_does_not_change_it(checkpoints, layout, overrides):
    requests = [ll_request("The sky is", " blue"), ll_request("The sky is", " green and red", 1),
                ll_request("Two plus two is", " four", 2), ll_request("", "Roses are red.", 3),
                ll_request("One plus one is two. Two plus two", " is four.", 4)]
    one = DiffusionMoeLM(pretrained=checkpoints[layout], mc_num=6, batch_size=1, seed=7, **overrides)
    many = DiffusionMoeLM(pretrained=checkpoints[layout], mc_num=6, batch_size="16", seed=7, **overrides)
    assert one.model.config.router_type == overrides.get("router_type", "token_choice")
    unbatched, batched = one.loglikelihood(requests), many.loglikelihood(requests)
    assert many.loglikelihood(requests) == batched  # same seed, same noise, same value
    reordered = many.loglikelihood(requests[::-1])[::-1]
    assert [score for score, _ in reordered] == pytest.approx([score for score, _ in batched], abs=1e-4)
    for (u, ug), (b, bg) in zip(unbatched, batched):
        assert u == pytest.approx(b, abs=1e-4) and ug == bg and math.isfinite(u) and u < 0
    other_seed = DiffusionMoeLM(pretrained=checkpoints[layout], mc_num=6, batch_size=16, seed=8, **overrides)
    assert other_seed.loglikelihood(requests[1:2])[0][0] != pytest.approx(batched[1][0], abs=1e-6)


def test_rolling_loglikelihood_sums_the_elbo_of_windows_within_max_length(checkpoints):
    lm = DiffusionMoeLM(pretrained=checkpoints["bidirectional"], mc_num=3, batch_size=8, max_length=12)
    text = "Some text for perplexity: the quick brown fox jumps over the lazy dog, again and again."
    tokens = lm.tok_encode(text)
    assert len(tokens) > 24
    widths = []
    hook = lm.model.base_model.register_forward_hook(lambda module, args, kwargs, out: widths.append(
        kwargs["input_ids"].shape[1]), with_kwargs=True)
    (total,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    hook.remove()
    assert widths and max(widths) <= 12
    windows = [make_disjoint_window(w) for w in get_rolling_token_windows(tokens, lm.prefix_token_id, 11, 1)]
    assert sum(len(c) for _, c in windows) == len(tokens) and windows[0][0] == [lm.prefix_token_id]
    assert total == pytest.approx(sum(score for score, _ in lm.elbo(windows, check_greedy=False)), abs=1e-6)
    assert lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, ("",), 0)]) == [0.0]


# ---------------------------------------------------------------- the mask token's text
def plain_ids(lm, text):
    """`text` encoded with the mask token's text as ordinary text (no other special token in it)."""
    return lm.tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)


def test_the_mask_tokens_text_is_ordinary_text_in_every_request_type(checkpoints):
    """Text never becomes the mask token: "<|mask|>" in a context, a continuation, a rolling text or a
    prompt is encoded as the characters it is made of, and each request type scores / answers exactly
    what it does for those token ids. (Before: loglikelihood let the model see a mask there, and
    generate_until failed in generate(): "The prompt contains the mask token".)"""
    lm = DiffusionMoeLM(pretrained=checkpoints["bidirectional"], mc_num=4, batch_size=8)
    mask = lm.tokenizer.mask_token
    context, continuation = f"The sky is {mask}", " blue."
    ids = lm.tok_encode(context)
    assert lm.mask_token_id not in ids and ids == plain_ids(lm, context) and lm.tok_decode(ids) == context
    whole = plain_ids(lm, context + continuation)
    expected = lm.elbo([(whole[: len(ids)], whole[len(ids):])])
    assert lm.loglikelihood([ll_request(context, continuation)]) == expected  # same tokens, same noise
    as_mask = lm.tokenizer.encode(context, add_special_tokens=False)
    assert lm.mask_token_id in as_mask  # what the model was shown before: a different input, another score
    assert lm.elbo([(as_mask, whole[len(ids):])])[0][0] != pytest.approx(expected[0][0], abs=1e-3)
    # in a continuation
    cont_ids = plain_ids(lm, "The sky is" + f" {mask}")[len(lm.tok_encode("The sky is")):]
    (score, _), = lm.loglikelihood([ll_request("The sky is", f" {mask}")])
    assert score == pytest.approx(lm.elbo([(lm.tok_encode("The sky is"), cont_ids)])[0][0], abs=1e-9)
    # rolling
    text = f"Roses are red. {mask} The sky is blue."
    windows = [make_disjoint_window(w) for w in get_rolling_token_windows(plain_ids(lm, text), lm.prefix_token_id,
                                                                         lm.max_length - 1, 1)]
    (total,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    assert total == pytest.approx(sum(s for s, _ in lm.elbo(windows, check_greedy=False)), abs=1e-9)
    # generation: the prompt's ids are the plain ones
    prompt = f"Q: {mask}+2=\nA:"
    settings = dict(max_new_tokens=8, block_length=4, steps=2)
    out = lm.model.generate(torch.tensor([plain_ids(lm, prompt)]), return_dict_in_generate=True, **settings)
    answer = [t for t in out.sequences[0, len(plain_ids(lm, prompt)):].tolist() if t != lm.tokenizer.pad_token_id]
    expected_text = lm.tok_decode(answer).split(lm.tokenizer.eos_token)[0]
    gen_kwargs = {"until": [], "max_gen_toks": 8, "do_sample": False, "block_length": 4, "steps": 2}
    assert lm.generate_until([gen_request(prompt, gen_kwargs)]) == [expected_text]


def test_a_tokenizer_that_reads_the_mask_tokens_text_as_the_mask_token_is_an_error_everywhere(word_level_checkpoint):
    """A word-level vocabulary maps the word "<mask>" to the mask id even as plain text: every request
    type refuses the text rather than show the model a mask."""
    lm = DiffusionMoeLM(pretrained=word_level_checkpoint, mc_num=2)
    message = r"mask token's text '<mask>' .*encodes as the mask token \(id 1\) even as plain text"
    requests = {
        "loglikelihood context": lambda: lm.loglikelihood([ll_request("the sky <mask> is", " blue")]),
        "loglikelihood continuation": lambda: lm.loglikelihood([ll_request("the sky is", " <mask>")]),
        "rolling": lambda: lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, ("the <mask> sky",), 0)]),
        "generate_until": lambda: lm.generate_until([gen_request("the sky <mask> is", {"until": ["."],
                                                                                       "max_gen_toks": 4})]),
    }
    for name, request in requests.items():
        with pytest.raises(ValueError, match=message):
            request()
    assert lm.tok_encode("the sky is blue") == [3, 4, 5, 6]  # other text is unaffected


# ---------------------------------------------------------------- arguments
def test_bad_model_args_raise_value_errors_naming_them(checkpoints, tasks):
    path = checkpoints["block_causal"]
    with pytest.raises(ValueError, match="stepz"):
        DiffusionMoeLM(pretrained=path, stepz=4)
    with pytest.raises(ValueError, match="max_new_tokens"):
        DiffusionMoeLM(pretrained=path, max_new_tokens=4)
    with pytest.raises(ValueError, match="auto"):
        DiffusionMoeLM(pretrained=path, batch_size="auto")
    with pytest.raises(ValueError, match="mc_num"):
        DiffusionMoeLM(pretrained=path, mc_num=0)
    with pytest.raises(ValueError, match="dtype"):
        DiffusionMoeLM(pretrained=path, dtype="int8")
    with pytest.raises(ValueError, match="steps"):  # a generation default generate() would reject
        DiffusionMoeLM(pretrained=path, steps=64, block_length=4)
    with pytest.raises(ValueError, match="router_type"):  # a config override the config rejects
        DiffusionMoeLM(pretrained=path, router_type="nope")
    with pytest.raises(ValueError, match="bogus"):  # through lm_eval's string model_args
        evaluate(tasks, ["tiny_mc"], model="diffusion_moe", model_args=f"pretrained={path},bogus=1", limit=1)
    lm = DiffusionMoeLM(pretrained=path, device="cuda:0", batch_size="8", max_batch_size=2, dtype="float32",
                        trust_remote_code="true", threshold=0.9, editing_threshold=0.5, max_post_steps=2,
                        temperature=0.0, do_sample=False)
    assert lm.device == torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    assert lm.batch_size == 2 and lm.model.dtype == torch.float32
    assert lm.generation_defaults == dict(threshold=0.9, editing_threshold=0.5, max_post_steps=2, temperature=0.0,
                                          do_sample=False)
