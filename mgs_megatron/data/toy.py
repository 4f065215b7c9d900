"""Toy multi-domain data, a tiny local tokenizer and a tiny chat reward model (no downloads).

Domains (chosen so a tiny policy can learn them in minutes and so they pull in different directions):
  math: short arithmetic, "What is 3+4? Put the answer in \\boxed{}.", answer "7";
  chat: short requests ("Say hello to Ana.") scored by a tiny reward model trained (a few CPU seconds,
        Bradley-Terry on synthetic pairs) to prefer polite, capitalised, on-topic short answers with commas and "!";
  if:   the SAME kind of requests with 1-2 IFEval instructions appended, mostly asking for the opposite style
        (lowercase, no commas, few words, a fixed ending, a <<title>>, a keyword): in the same contexts the two
        domains want different tokens, so their gradients pull the shared modules apart (docs/results.md shows the
        measured conflicts).
Demonstrations for the supervised warm-up (`build_demonstrations`): a right answer, or with probability `noise` a
wrong / rule-breaking / rejected one, built from each row's own fields.
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Sequence

NAMES = ["Ana", "Ben", "Cleo", "Dan", "Eva", "Finn", "Gina", "Hugo", "Ivy", "Jon"]
TOPICS = ["cats", "dogs", "rain", "tea", "books", "music", "trees", "the sea", "bread", "stars"]
SPECIALS = {"pad": "<|pad|>", "eos": "<|im_end|>", "bos": "<|im_start|>", "unk": "<|endoftext|>"}
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

# (instruction id, kwargs maker, prompt text) -- every kwarg explicit (see rewards/ifeval.py)
_IF_INSTRUCTIONS = [
    ("change_case:english_lowercase", lambda r, t: {}, lambda kw: "Use only lowercase letters."),
    ("punctuation:no_comma", lambda r, t: {}, lambda kw: "Do not use any commas."),
    ("length_constraints:number_words", lambda r, t: {"relation": "less than", "num_words": r.randint(6, 12)},
     lambda kw: f"Answer in fewer than {kw['num_words']} words."),
    ("startend:end_checker", lambda r, t: {"end_phrase": "That is all."},
     lambda kw: f"End your answer with the exact phrase \"{kw['end_phrase']}\"."),
    ("detectable_format:title", lambda r, t: {}, lambda kw: "Start with a title in double angular brackets, "
                                                            "like <<my title>>."),
    ("keywords:existence", lambda r, t: {"keywords": [t.split()[-1]]},
     lambda kw: f"Use the word \"{kw['keywords'][0]}\"."),
    ("change_case:english_capital", lambda r, t: {}, lambda kw: "Use only capital letters."),
    ("startend:quotation", lambda r, t: {}, lambda kw: "Wrap your whole answer in double quotes."),
]
_CONFLICTS = {("change_case:english_lowercase", "change_case:english_capital"),
              ("change_case:english_capital", "detectable_format:title")}


def make_math_rows(n: int, rng: random.Random) -> list[dict]:
    rows = []
    for i in range(n):
        a, b, op = rng.randint(0, 20), rng.randint(0, 20), rng.choice("+-*")
        ans = {"+": a + b, "-": a - b, "*": a * b}[op]
        rows.append({"id": f"math-{i}", "domain": "math",
                     "prompt": f"What is {a}{op}{b}? Put the answer in \\boxed{{}}.", "answer": str(ans)})
    return rows


_CHAT_FORMS = ["Say hello to {name}.", "Tell me about {topic}.", "Thank {name} for the {topic}.",
               "Ask {name} about {topic}.", "Say something kind about {topic}."]


def chat_request(rng: random.Random) -> str:
    return rng.choice(_CHAT_FORMS).format(name=rng.choice(NAMES), topic=rng.choice(TOPICS))


def request_subject(prompt: str) -> str:
    """The name a request mentions, else its last word ("Tell me about the sea." -> "sea")."""
    words = prompt.split(".", 1)[0].split()
    return next((w for w in words if w in NAMES), None) or words[-1]


def make_if_rows(n: int, rng: random.Random) -> list[dict]:
    """The chat domain's requests with 1-2 instructions appended: the same contexts, another style asked for."""
    rows = []
    for i in range(n):
        request = chat_request(rng)
        topic = request_subject(request)
        picks = rng.sample(_IF_INSTRUCTIONS, rng.choice([1, 1, 2]))
        if len(picks) == 2 and ((picks[0][0], picks[1][0]) in _CONFLICTS or (picks[1][0], picks[0][0]) in _CONFLICTS):
            picks = picks[:1]
        ids, kwargs, texts = [], [], []
        for iid, mk, txt in picks:
            kw = mk(rng, topic)
            ids.append(iid), kwargs.append(kw), texts.append(txt(kw))
        rows.append({"id": f"if-{i}", "domain": "if", "prompt": f"{request} " + " ".join(texts),
                     "instruction_id_list": ids, "kwargs": kwargs})
    return rows


def make_chat_rows(n: int, rng: random.Random) -> list[dict]:
    return [{"id": f"chat-{i}", "domain": "chat", "prompt": chat_request(rng)} for i in range(n)]


def write_toy_data(out_dir: str | Path, n_per_domain: int = 200, seed: int = 0) -> dict[str, Path]:
    """Write {math,if,chat}.jsonl under out_dir; returns {domain: path}."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for k, (domain, maker) in enumerate([("math", make_math_rows), ("if", make_if_rows), ("chat", make_chat_rows)]):
        rows = maker(n_per_domain, random.Random(seed * 1000 + k))
        paths[domain] = out_dir / f"{domain}.jsonl"
        with open(paths[domain], "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    return paths


# ------------------------------------------------------------------ chat preference pairs
def chat_pair(prompt: str, rng: random.Random) -> tuple[str, str]:
    """(preferred, rejected) responses for a toy chat prompt."""
    subject = request_subject(prompt)
    good = rng.choice([f"Hello, {subject}! It is a pleasure to help, thank you!",
                       f"Sure, {subject} is lovely! Thank you for asking!",
                       f"Of course! {subject.capitalize()}, thank you, have a great day!",
                       f"Gladly, here you go: {subject} is wonderful, thanks!"])
    bad = rng.choice(["no.", "whatever", "i do not care", f"{rng.randint(0, 99)}+{rng.randint(0, 9)}",
                      "go away now", " ".join(rng.choice(TOPICS) for _ in range(8)),
                      f"{subject} {subject} {subject} {subject}", "<<title>> that is all."])
    return good, bad


# ------------------------------------------------------------------ warm-up demonstrations
def math_demo(row: dict, rng: random.Random, noisy: bool) -> str:
    ans = int(row["answer"]) if str(row["answer"]).lstrip("-").isdigit() else row["answer"]
    if noisy:
        ans = ans + rng.choice([-3, -2, -1, 1, 2, 3, 10]) if isinstance(ans, int) else f"{ans}0"
    return f"\\boxed{{{ans}}}"


def if_demo(row: dict, rng: random.Random, noisy: bool) -> str:
    """A response that follows every instruction of the row (or, noisy, a chat-style one that breaks most)."""
    topic = request_subject(row["prompt"])
    ids = list(row.get("instruction_id_list", []))
    kws = {iid: (kw or {}) for iid, kw in zip(ids, row.get("kwargs", []))}
    if noisy:
        return rng.choice([f"Hello, {topic} are great, thank you!", f"Well, {topic}, {topic}, and more, sure!",
                           f"Sure, I can talk about {topic}, of course, it is lovely!"])
    end = kws.get("startend:end_checker", {}).get("end_phrase")
    short = "length_constraints:number_words" in ids
    # (IFEval's case checks run langdetect, which needs a few real English words; these pass for every topic)
    body = rng.choice([f"I think {topic} are the best.", f"The best is {topic}."])
    if short:
        body = f"{topic.capitalize()}." if end else f"The best is {topic}."
    parts = []
    if "detectable_format:title" in ids:
        parts.append(f"<<{topic}>>")
    parts.append(body)
    if end:
        parts.append(end)
    text = " ".join(parts)
    if "startend:quotation" in ids:
        text = f"\"{text}\""
    if "change_case:english_capital" in ids:
        text = text.upper()
    elif "change_case:english_lowercase" in ids:
        text = text.lower()
    return text


def chat_demo(row: dict, rng: random.Random, noisy: bool) -> str:
    good, bad = chat_pair(row["prompt"], rng)
    return bad if noisy else good


DEMO_BUILDERS = {"math": math_demo, "if": if_demo, "chat": chat_demo}


def build_demonstrations(rows: Sequence[dict], noise: float, seed: int, copies: int = 1) -> list[dict]:
    """Supervised warm-up data (rl/warmup.py): [{domain, prompt, response, noisy}] for rows of the toy domains
    (others are skipped); deterministic in seed.
    `copies` draws that many demonstrations per row (fresh noise / phrasing each)."""
    rng = random.Random(seed)
    out = []
    for c in range(copies):
        for row in rows:
            fn = DEMO_BUILDERS.get(row.get("domain"))
            if fn is None:
                continue
            noisy = rng.random() < noise
            out.append({"domain": row["domain"], "prompt": row["prompt"], "response": fn(row, rng, noisy),
                        "noisy": noisy, "row": row})
    return out


# ------------------------------------------------------------------ tokenizer
def _corpus(seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    texts = [r["prompt"] for mk in (make_math_rows, make_if_rows, make_chat_rows) for r in mk(300, rng)]
    for r in make_chat_rows(200, rng):
        texts.extend(chat_pair(r["prompt"], rng))
    texts += [f"\\boxed{{{i}}}" for i in range(-20, 401)] + ["That is all.", "<<title>>", "\"quoted\""]
    return texts


def build_toy_tokenizer(out_dir: str | Path | None = None, vocab_size: int = 512, seed: int = 0):
    """Byte-level BPE (any text encodes) trained on the toy corpus, ChatML template, eos <|im_end|>, pad <|pad|>.
    Saved with save_pretrained when out_dir is given; works with transformers and vLLM."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    specials = [SPECIALS["unk"], SPECIALS["pad"], SPECIALS["bos"], SPECIALS["eos"]]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(_corpus(seed), trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token=SPECIALS["eos"], pad_token=SPECIALS["pad"],
                                  unk_token=SPECIALS["unk"], model_max_length=1024)
    tok.chat_template = CHAT_TEMPLATE
    if out_dir is not None:
        tok.save_pretrained(str(out_dir))
    return tok


# ------------------------------------------------------------------ reward model
def build_toy_reward_model(out_dir: str | Path, tokenizer=None, steps: int = 60, seed: int = 0,
                           hidden_size: int = 64, num_layers: int = 2) -> Path:
    """Tiny Qwen2ForSequenceClassification (head_dim 32, which vLLM's CPU attention accepts) trained with a
    Bradley-Terry loss on `chat_pair`s; saved with its tokenizer to out_dir. A few seconds on CPU."""
    import torch
    from transformers import Qwen2Config, Qwen2ForSequenceClassification
    torch.manual_seed(seed)
    tok = tokenizer if tokenizer is not None else build_toy_tokenizer()
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                      num_hidden_layers=num_layers, num_attention_heads=hidden_size // 32, num_key_value_heads=1,
                      max_position_embeddings=1024, num_labels=1, pad_token_id=tok.pad_token_id,
                      eos_token_id=tok.eos_token_id, bos_token_id=None, tie_word_embeddings=False)
    model = Qwen2ForSequenceClassification(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rng = random.Random(seed)
    prompts = [r["prompt"] for r in make_chat_rows(400, rng)]
    tok.padding_side = "right"
    model.train()
    for _ in range(steps):
        batch = rng.sample(prompts, 16)
        pairs = [chat_pair(p, rng) for p in batch]
        texts = [tok.apply_chat_template([{"role": "user", "content": p}, {"role": "assistant", "content": r}],
                                         tokenize=False) for p, pr in zip(batch, pairs) for r in pr]
        enc = tok(texts, padding=True, add_special_tokens=False, return_tensors="pt")
        r = model(**enc).logits[:, 0].view(-1, 2)
        loss = -torch.nn.functional.logsigmoid(r[:, 0] - r[:, 1]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    out_dir = Path(out_dir)
    model.save_pretrained(str(out_dir))
    tok.save_pretrained(str(out_dir))
    return out_dir


def ensure_toy_assets(root: str | Path, reward_model: bool = True, seed: int = 0) -> dict[str, Path]:
    """Create (once) data jsonl, tokenizer/ and, if asked, reward_model/ under root; returns their paths."""
    root = Path(root)
    paths = {d: root / f"{d}.jsonl" for d in ("math", "if", "chat")}
    if not all(p.exists() for p in paths.values()):
        paths = write_toy_data(root, seed=seed)
    out = dict(paths)
    out["tokenizer"] = root / "tokenizer"
    if not (out["tokenizer"] / "tokenizer.json").exists():
        build_toy_tokenizer(out["tokenizer"], seed=seed)
    if reward_model:
        out["reward_model"] = root / "reward_model"
        if not (out["reward_model"] / "config.json").exists():
            from transformers import AutoTokenizer
            build_toy_reward_model(out["reward_model"], AutoTokenizer.from_pretrained(str(out["tokenizer"])),
                                   seed=seed)
    return out
