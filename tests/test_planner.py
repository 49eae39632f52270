"""Layout planners: the rule planner on templated prompts, strict parsing of LLM answers, the
LLM planner against a local fake OpenAI-compatible server, in-context example selection,
and scripts/plan.py."""

import http.server
import json
import threading

import pytest
from conftest import load_script

from goal_jax import layout as layout_lib
from goal_jax import planner as P
from goal_jax.evaluation import metrics



def _groups(layout):
    """phrase -> number of boxes."""
    out = {}
    for p in layout.phrases:
        out[p] = out.get(p, 0) + 1
    return out


def _centre_relation(layout, a, b):
    """Relation of every box of phrase a to every box of phrase b (a set)."""
    ba = [box for p, box in zip(layout.phrases, layout.boxes) if p == a]
    bb = [box for p, box in zip(layout.phrases, layout.boxes) if p == b]
    return {metrics.spatial_relation(x, y) for x in ba for y in bb}


# ----------------------------------------------------------------------------------------------
# Rule planner.
# ----------------------------------------------------------------------------------------------

COUNT_CASES = [
    ("there is one clock in the image", {"clock": 1}),
    ("an image of two clocks", {"clock": 2}),
    ("five giraffes are in the photo", {"giraffe": 5}),
    ("a photo of 3 dogs", {"dog": 3}),
    ("three red apples and two yellow bananas", {"red apple": 3, "yellow banana": 2}),
    ("a red cube and a blue sphere", {"red cube": 1, "blue sphere": 1}),
    ("a striped cat, a dotted dog and a green car", {"striped cat": 1, "dotted dog": 1,
                                                     "green car": 1}),
    # NSR-1K comparison templates.
    ("a picture of four giraffes along with a few zebras, the number of giraffes is more "
     "than that of zebras", {"giraffe": 4, "zebra": 3}),
    ("a photo of three giraffes with a few zebras, the number of giraffes is less than that "
     "of zebras", {"giraffe": 3, "zebra": 4}),
    ("a photo of two cars and a few buss, the number of cars is more than that of buss",
     {"car": 2, "bus": 1}),
    ("an image of one giraffe with the same number of zebra", {"giraffe": 1, "zebra": 1}),
    ("there are two cars along with the equal number of bus", {"car": 2, "bus": 2}),
]


@pytest.mark.parametrize("caption,expected", COUNT_CASES)
def test_rule_planner_counts(caption, expected):
    layout = P.RulePlanner().plan(caption)
    assert isinstance(layout, layout_lib.Layout)
    assert _groups(layout) == expected
    # Valid and non-overlapping boxes (the planner tiles disjoint cells).
    layout_lib.validate(layout.phrases, layout.boxes)
    for i, a in enumerate(layout.boxes):
        for b in layout.boxes[i + 1:]:
            assert min(a[2], b[2]) <= max(a[0], b[0]) or min(a[3], b[3]) <= max(a[1], b[1])


SPATIAL_CASES = [
    ("a toilet to the left of a dog", "toilet", "dog", "left"),
    ("a red cat left of a blue dog", "red cat", "blue dog", "left"),
    ("a horse on the right of a car", "horse", "car", "right"),
    ("a potted plant to the right of a toilet", "potted plant", "toilet", "right"),
    ("a tv on top of a dog", "tv", "dog", "top"),
    ("a yellow star above a green square", "yellow star", "green square", "top"),
    ("a bird under a car", "bird", "car", "bottom"),
    ("a purple circle below an orange triangle", "purple circle", "orange triangle", "bottom"),
    ("a cat next to a tree", "cat", "tree", "next to"),
]


@pytest.mark.parametrize("caption,a,b,relation", SPATIAL_CASES)
def test_rule_planner_relations(caption, a, b, relation):
    layout = P.RulePlanner().plan(caption)
    assert _groups(layout) == {a: 1, b: 1}
    rel = _centre_relation(layout, a, b)
    assert metrics.relation_holds(relation, *zip(*[
        (x, y) for p, x in zip(layout.phrases, layout.boxes) if p == a
        for q, y in zip(layout.phrases, layout.boxes) if q == b]))
    if relation != "next to":
        assert rel == {relation}


def test_rule_planner_counts_with_relation_and_fallbacks():
    layout = P.RulePlanner().plan("two red cats to the left of three blue dogs")
    assert _groups(layout) == {"red cat": 2, "blue dog": 3}
    assert _centre_relation(layout, "red cat", "blue dog") == {"left"}
    # Nothing to split: one centred box with the caption as its phrase.
    assert P.RulePlanner().plan("!!!") == layout_lib.Layout(("!!!",), ((0.1, 0.1, 0.9, 0.9),))
    # More than 30 objects are capped to GLIGEN's 30 slots.
    assert len(P.RulePlanner().plan("40 cats")) == 30
    with pytest.raises(P.PlannerError, match="caption is empty"):
        P.RulePlanner().plan("  ")
    with pytest.raises(P.PlannerError, match="caption must be a string"):
        P.RulePlanner().plan(None)


def test_name_matching():
    assert P.singular("buss") == "bus" and P.singular("cherries") == "cherry"
    assert P.singular("boxes") == "box" and P.singular("glass") == "glass"
    # "-is" plurals (9 NSR-1K template prompts say "broccolis"); "tennis" stays.
    assert P.singular("broccolis") == "broccoli" and P.singular("tennis") == "tennis"
    assert P.name_matches("car", "a red car") and P.name_matches("fire hydrant", "hydrant")
    assert P.name_matches("apple", "three apples")
    assert not P.name_matches("car", "carpet") and not P.name_matches("cat", "dog")


# ----------------------------------------------------------------------------------------------
# Parsing LLM answers.
# ----------------------------------------------------------------------------------------------


def test_parse_css_layout_valid():
    text = ("```\nLayout:\nred cat {width: 16px; height: 32px; left: 8px; top: 16px; }\n"
            "- blue dog {left: 40px; top: 0; width: 30px; height: 64px}\n```\n")
    layout = P.parse_css_layout(text, canvas=64)
    assert layout.phrases == ("red cat", "blue dog")
    assert layout.boxes[0] == (8 / 64, 16 / 64, 24 / 64, 48 / 64)
    # Right edge 40 + 30 = 70 > 64 is clipped to the canvas, as LayoutGPT does.
    assert layout.boxes[1] == (40 / 64, 0.0, 1.0, 1.0)
    # Round trip through the example formatter.
    again = P.parse_css_layout(P.format_css_layout(layout, 64), 64)
    assert again.phrases == layout.phrases
    assert max(abs(a - b) for x, y in zip(again.boxes, layout.boxes)
               for a, b in zip(x, y)) <= 1 / 64


@pytest.mark.parametrize("text,message", [
    ("", "no layout lines"),
    ("Sure! Here is the layout.", "line 1 ('Sure! Here is the layout.') is not"),
    ("cat {width: 10px; height: 10px; left: 0px; top: 0px; }\ndog {width: 10px; height: 10px; "
     "left: 0px; }", "line 2"),
    ("dog {width: 10px; height: 10px; left: 0px; }", "missing top"),
    ("dog {width: 10px; height: 10px; left: 0px; top: 1px; depth: 3px}",
     "unknown property 'depth'"),
    ("dog {width: 10px; width: 12px; height: 10px; left: 0px; top: 1px}", "given twice"),
    ("dog {width: 0px; height: 10px; left: 0px; top: 1px}", "must be > 0"),
    ("dog {width: 10px; height: 10px; left: 64px; top: 1px}", "outside the 64px canvas"),
    ("dog {width: ten; height: 10px; left: 0px; top: 1px}", "is not 'name: <number>px'"),
    (" {width: 10px; height: 10px; left: 0px; top: 1px}", "no object description"),
])
def test_parse_css_layout_malformed(text, message):
    with pytest.raises(P.LayoutParseError, match=None) as e:
        P.parse_css_layout(text, canvas=64)
    assert message in str(e.value)


def test_example_selection_and_messages():
    ex = [P.Example("a blue car", layout_lib.Layout(("car",), ((0, 0, 0.5, 0.5),))),
          P.Example("a red cat to the left of a dog",
                    layout_lib.Layout(("cat", "dog"), ((0, 0, 0.5, 1), (0.5, 0, 1, 1)))),
          P.Example("two cats", layout_lib.Layout(("cat", "cat"), ((0, 0, .5, 1), (.5, 0, 1, 1))))]
    assert P.word_overlap("a red cat", "a red cat") == 1.0
    assert P.word_overlap("a cat", "two dogs") == 0.0
    chosen = P.select_examples("a red cat to the right of a dog", ex, 2)
    assert [c.caption for c in chosen] == ["a red cat to the left of a dog", "a blue car"]
    msgs = P.build_messages("a red cat to the right of a dog", chosen, canvas=64)
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant",
                                         "user"]
    assert "64px wide and 64px high" in msgs[0]["content"]
    # Most similar example last, next to the question (LayoutGPT's order).
    assert msgs[3]["content"] == "Prompt: a red cat to the left of a dog\nLayout:"
    assert msgs[4]["content"] == ("cat {width: 32px; height: 64px; left: 0px; top: 0px; }\n"
                                  "dog {width: 32px; height: 64px; left: 32px; top: 0px; }")
    assert msgs[-1]["content"] == "Prompt: a red cat to the right of a dog\nLayout:"


def test_load_examples(tmp_path):
    jsonl = tmp_path / "ex.jsonl"
    jsonl.write_text(json.dumps({"caption": "a cat", "phrases": ["cat"],
                                 "boxes": [[0.1, 0.1, 0.5, 0.5]]}) + "\n")
    assert P.load_examples(str(jsonl)) == [
        P.Example("a cat", layout_lib.Layout(("cat",), ((0.1, 0.1, 0.5, 0.5),)))]
    nsr = tmp_path / "spatial.train.json"
    nsr.write_text(json.dumps([{"id": 1, "obj1": ["toilet", [0.0, 0.2, 0.2, 0.3]],
                                "obj2": ["dog", [0.5, 0.5, 0.4, 0.3]],
                                "prompt": "a toilet to the left of a dog", "relation": "left"}]))
    (got,) = P.load_examples(str(nsr))
    assert got.caption == "a toilet to the left of a dog"
    assert got.layout.phrases == ("toilet", "dog")
    assert got.layout.boxes[1] == pytest.approx((0.5, 0.5, 0.9, 0.8))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"caption": "x", "phrases": ["cat"], "boxes": [[0.5, 0, 0.1, 1]]})
                   + "\n")
    with pytest.raises(P.PlannerError, match="bad.jsonl line 1: box 0 .* x0 >= x1"):
        P.load_examples(str(bad))


# ----------------------------------------------------------------------------------------------
# LLM planner against a local fake server.
# ----------------------------------------------------------------------------------------------


class FakeLLM:
    """An OpenAI-compatible /v1/chat/completions on 127.0.0.1 answering from a script."""

    def __init__(self):
        self.answers = []  # (status, content) consumed in order; the last one repeats
        self.requests = []
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests.append({"path": self.path, "body": body,
                                      "auth": self.headers.get("Authorization")})
                status, content = (fake.answers.pop(0) if len(fake.answers) > 1
                                   else fake.answers[0])
                payload = (json.dumps({"choices": [{"message": {"role": "assistant",
                                                                "content": content}}]})
                           if status == 200 else json.dumps({"error": content}))
                data = payload.encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,),
                                       daemon=True)
        self.thread.start()
        self.api_base = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake_llm():
    fake = FakeLLM()
    yield fake
    fake.close()


VALID = "red cat {width: 24px; height: 32px; left: 4px; top: 16px; }\n" \
        "blue dog {width: 24px; height: 32px; left: 36px; top: 16px; }"


def _planner(fake, **kw):
    client = P.OpenAIChatClient(fake.api_base, model="fake-gpt", api_key="sk-test", timeout=10)
    ex = [P.Example("a cat", layout_lib.Layout(("cat",), ((0.25, 0.25, 0.75, 0.75),)))]
    return P.LLMPlanner(client, ex, k=4, canvas=64, retry_wait=0.0, **kw)


def test_llm_planner_valid(fake_llm):
    fake_llm.answers = [(200, VALID)]
    planner = _planner(fake_llm)
    layout = planner.plan("a red cat to the left of a blue dog")
    assert layout.phrases == ("red cat", "blue dog")
    assert layout.boxes == ((4 / 64, 16 / 64, 28 / 64, 48 / 64), (36 / 64, 16 / 64, 60 / 64,
                                                                  48 / 64))
    (req,) = fake_llm.requests
    assert req["path"] == "/v1/chat/completions"
    assert req["auth"] == "Bearer sk-test"
    assert req["body"]["model"] == "fake-gpt"
    roles = [m["role"] for m in req["body"]["messages"]]
    assert roles == ["system", "user", "assistant", "user"]
    assert req["body"]["messages"][2]["content"] == \
        "cat {width: 32px; height: 32px; left: 16px; top: 16px; }"
    assert planner.log[-1] == {"caption": "a red cat to the left of a blue dog", "attempts": 1,
                               "problems": []}


def test_llm_planner_malformed_then_valid(fake_llm):
    fake_llm.answers = [(200, "I think the cat goes left."), (500, "overloaded"), (200, VALID)]
    planner = _planner(fake_llm, attempts=3)
    layout = planner.plan("a red cat to the left of a blue dog")
    assert layout.phrases == ("red cat", "blue dog")
    assert len(fake_llm.requests) == 3
    assert planner.log[-1]["attempts"] == 3
    assert "line 1 ('I think the cat goes left.') is not" in planner.log[-1]["problems"][0]
    assert "HTTP 500" in planner.log[-1]["problems"][1]


def test_llm_planner_always_malformed(fake_llm):
    fake_llm.answers = [(200, "cat {width: 10px; height: 10px; left: 0px; }")]
    planner = _planner(fake_llm, attempts=3)
    with pytest.raises(P.PlannerError) as e:
        planner.plan("a cat")
    msg = str(e.value)
    assert "no valid layout for caption 'a cat' after 3 attempt(s)" in msg
    assert "line 1" in msg and "missing top" in msg
    assert len(fake_llm.requests) == 3


def test_llm_planner_client_errors(fake_llm):
    fake_llm.answers = [(401, "bad key")]
    with pytest.raises(P.PlannerError, match="answered HTTP 401"):
        _planner(fake_llm).plan("a cat")
    assert len(fake_llm.requests) == 1  # a client error is not retried
    closed = P.OpenAIChatClient("http://127.0.0.1:9/v1", model="m", timeout=2)
    with pytest.raises(P.PlannerError, match="cannot reach http://127.0.0.1:9/v1"):
        P.LLMPlanner(closed).plan("a cat")


def test_plan_layout_default_and_env(fake_llm, monkeypatch):
    for var in (P.ENV_MODEL, P.ENV_LOCAL_LM, P.ENV_API_BASE, P.ENV_API_KEY):
        monkeypatch.delenv(var, raising=False)
    # No LLM configured: the rule planner.
    assert P.make_planner().name == "rule"
    assert P.plan_layout("two cats").phrases == ("cat", "cat")
    # Configured through the environment: the LLM.
    monkeypatch.setenv(P.ENV_MODEL, "fake-gpt")
    monkeypatch.setenv(P.ENV_API_BASE, fake_llm.api_base)
    fake_llm.answers = [(200, VALID)]
    assert P.plan_layout("a red cat to the left of a blue dog").phrases == ("red cat",
                                                                            "blue dog")
    assert fake_llm.requests[-1]["body"]["model"] == "fake-gpt"
    with pytest.raises(P.PlannerError, match="unknown planner 'gpt'"):
        P.make_planner("gpt")


def test_transformers_chat_client(tmp_path):
    """A tiny random local causal LM answers text; garbage answers end in a clear error."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(
        ["<eos>", "<unk>", "cat", "{", "}", "width", ":", "10px", ";", "Prompt", "Layout"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>")
    fast.save_pretrained(str(tmp_path))
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(vocab), n_positions=256, n_embd=16,
                                       n_layer=1, n_head=2, eos_token_id=0, bos_token_id=0))
    model.save_pretrained(str(tmp_path))
    client = P.TransformersChatClient(str(tmp_path), max_new_tokens=5)
    assert client.prompt_text([{"role": "user", "content": "Prompt: cat"}]) == \
        "user: Prompt: cat\nassistant:"
    answer = client([{"role": "user", "content": "Prompt: cat"}])
    assert isinstance(answer, str)
    planner = P.LLMPlanner(client, attempts=2)
    try:
        layout = planner.plan("cat")
    except P.PlannerError as e:
        assert "after 2 attempt(s)" in str(e)
    else:  # a random model producing a valid layout is still a valid layout
        layout_lib.validate(layout.phrases, layout.boxes)


# ----------------------------------------------------------------------------------------------
# scripts/plan.py
# ----------------------------------------------------------------------------------------------


def test_plan_script(tmp_path, monkeypatch, capsys):
    for var in (P.ENV_MODEL, P.ENV_LOCAL_LM):
        monkeypatch.delenv(var, raising=False)
    plan = load_script("plan")
    captions = tmp_path / "captions.txt"
    captions.write_text("a red cat to the left of a blue dog\n\nthree apples\n")
    out = tmp_path / "layouts.jsonl"
    assert plan.main(["--captions", str(captions), "--output", str(out), "--seed", "5"]) == 0
    items = layout_lib.read_jsonl(str(out))  # what scripts/sample.py --jsonl reads
    assert [(n, it.id, it.seed) for n, it in items] == [(1, "line00001", 5), (2, "line00003", 7)]
    assert items[0][1].layout.phrases == ("red cat", "blue dog")
    assert items[1][1].layout.phrases == ("apple",) * 3
    capsys.readouterr()
    assert plan.main(["--caption", "a cat"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["caption"] == "a cat" and printed["phrases"] == ["cat"]
    assert plan.main(["--caption", "a cat", "--planner", "openai"]) == 2
    assert "no model name" in capsys.readouterr().err
