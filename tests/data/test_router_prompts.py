"""Router-only training prompts: the intended form for each kind, seeded, and never an evaluation prompt."""

from __future__ import annotations

import random
import re

import pytest

from router.domains import DOMAINS
from training.data import router_examples
from training.data import router_prompts as rp
from training.data.eval_prompts import eval_prompt_examples

INSTRUCTIONS = re.compile(r"please follow|Return only|Provide your|Final answer format|Round decimal", re.I)


def _norm(text: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9]+", " ", text.lower()).split())


def test_symbolic_math_reads_as_algebra_without_format_instructions() -> None:
    ps = rp.symbolic_math("train", 40, seed=0)
    assert 30 <= len(ps) <= 40 and len(set(ps)) == len(ps)
    assert not [p for p in ps if INSTRUCTIONS.search(p)]
    assert any("^" in p for p in ps) and any("**" in p for p in ps)  # typed and generated notation
    assert any("∫" in p for p in ps) and any(re.search(r"\d\.0i\)", p) for p in ps)
    assert rp.symbolic_math("train", 40, seed=0) == ps
    assert len(set(ps) & set(rp.symbolic_math("val", 40, seed=0))) <= 2  # splits draw other items


def test_notation_math_has_letters_functions_and_sequences() -> None:
    ps = rp.notation_math(200, random.Random(0))
    assert len(ps) == 200 == len(set(ps))
    assert all(re.search(r"\d[a-z]|\^|f\(|a_", p) or "..." in p for p in ps)  # letters stand for numbers
    assert any("f(x)" in p for p in ps) and any("a_" in p for p in ps) and any("..." in p for p in ps)
    assert ps == rp.notation_math(200, random.Random(0))


def test_multiple_choice_lists_the_answer_among_distractors() -> None:
    docs = [{"source": f"g{i % 2}", "question": f"How many r in word{i}?", "answer": str(i)} for i in range(12)]
    docs.append({"source": "g0", "question": "Grid?", "answer": "1 2\n3 4"})  # multi-line answers are left out
    ps = rp.multiple_choice(docs, 10, random.Random(0))
    assert len(ps) == 10
    for p in ps:
        question, options = p.split("\nOptions:\n")
        listed = re.findall(r"^\(([A-H])\) (.+)$", options, re.M)
        assert [k for k, _ in listed] == list("ABCDE"[:len(listed)]) and 3 <= len(listed) <= 5
        i = int(re.search(r"word(\d+)", question).group(1))
        answers = [a for _, a in listed]
        assert str(i) in answers and len(set(answers)) == len(answers)
        assert all(int(a) % 2 == i % 2 for a in answers)  # distractors from the same generator


def test_extra_reasoning_puzzles_keep_their_premises() -> None:
    ps = rp.extra_reasoning("train", 24, seed=0)
    assert len(ps) >= 20
    syllogisms = [p for p in ps if p.startswith("Consider these statements")]
    assert syllogisms and all("\n1." in p and "\n2." in p for p in syllogisms)


def test_knowledge_questions_ask_back_from_the_fact() -> None:
    rng = random.Random(0)
    fb = {"source": "cia_world_factbook",
          "text": "Australia: Government\nAustralia, Capital - name: Canberra\n"
                  "Australia, Airports: 480 (2025)\nAustralia, Area - total: 7.7 million sq km"}
    qs = [q for _ in range(20) for q in rp.reverse_factbook(fb, rng)]
    assert any("Canberra" in q and "which country" in q.lower() or "What country's" in q for q in qs)
    assert any(q.lower().startswith("how many airports") or "has how many airports" in q for q in qs)
    assert not [q for q in qs if "7.7" in q]  # figures are not asked back
    wn = {"source": "wordnet-base", "text": "Gainsborough (noun): English portrait and landscape painter (1727-1788)"}
    qs = [q for _ in range(20) for q in rp.proper_noun_question(wn, rng)]
    assert any(q.startswith(("Who was the English portrait", "who was the English")) for q in qs)
    assert any("Gainsborough" in q for q in qs) and not [q for q in qs if "1727" in q]
    place = {"source": "wordnet-base", "text": "Bonete (noun): a mountain in the Andes in Argentina"}
    assert any("mountain in the Andes" in q for q in rp.proper_noun_question(place, rng))
    assert rp.proper_noun_question({"source": "wordnet-base", "text": "cat (noun): a feline mammal"}, rng) == []


def test_code_requests_name_another_language() -> None:
    r = {"source": "stdlib",
         "text": 'def split_lines(text):\n    """Split text into lines."""\n    return text.split()'}
    rng = random.Random(0)
    qs = [q for _ in range(30) for q in rp.code_requests(r, rng)]
    assert qs and all(any(lang in q for lang in rp.LANGUAGES) for q in qs)
    assert any("split lines" in q for q in qs) and any("split text into lines" in q for q in qs)
    assert not [q for q in qs if "Python" in q]
    assert rp.code_requests({"source": "stdlib", "text": "def test_x():\n    pass"}, rng) == []


def test_router_examples_add_the_shares_and_leave_test_prompts_alone(tiny_corpus) -> None:
    base = router_examples(tiny_corpus, "train", per_domain=20, seed=1)
    ex = router_examples(tiny_corpus, "train", per_domain=20, seed=1, router_only=True)
    assert ex == router_examples(tiny_corpus, "train", per_domain=20, seed=1, router_only=True)  # seeded
    extra = [e for e in ex if e not in set(base)]
    counts = {d: sum(1 for _, dd in extra if dd == d) for d in DOMAINS}
    assert counts["conversation"] == 0
    assert all(0 < counts[d] <= int(share * 20) for d, share in rp.SHARES.items()), counts
    assert router_examples(tiny_corpus, "test", per_domain=20, seed=1) == \
        router_examples(tiny_corpus, "test", per_domain=20, seed=1, router_only=False)


def test_no_router_only_prompt_is_an_evaluation_prompt(tiny_corpus) -> None:
    examples, _ = eval_prompt_examples()
    if not examples:
        pytest.skip("no evaluation-only prompt source installed")
    evaluation = {_norm(p) for p, _ in examples}
    ours = {_norm(p) for s in ("train", "val") for d in DOMAINS
            for p in rp.router_prompts(tiny_corpus, d, s, 400, seed=0)}
    ours |= {_norm(p) for p in rp.notation_math(5000, random.Random(1))}
    assert len(ours) > 1000 and not ours & evaluation
