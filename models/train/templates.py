#!/usr/bin/env python3
"""The evaluation tasks' text formats in Python, for building needle-tiny's training data with the
very strings needle's C++ generators (datasets/) evaluate with. tests/test_templates.cc runs
`python3 models/train/templates.py --golden` and compares every string with the C++ functions.
Training data must never reuse the evaluation seeds: draw it from a different random stream."""
import json
import sys

NOISE_LINE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.\n"
NOISE_SENTENCE = NOISE_LINE.rstrip("\n")


# ---- InfiniteBench (datasets/infinitebench.cc) ----
def passkey_needle(key):
    return f"The pass key is {key}. Remember it. {key} is the pass key.\n"


def number_string_needle(key):
    return f"The sequence of digits is {key}. Remember it. {key} is the sequence of digits.\n"


def infinitebench_question(task):
    return {"passkey": "What is the pass key?", "number_string": "What is the sequence of digits?"}[task]


def kv_context(pairs):
    return "JSON data:\n{" + ", ".join(f'"{k}": "{v}"' for k, v in pairs) + "}"


def kv_input(key):
    return f'\nKey: "{key}"\nThe value associated with the specified key is: '


def infinitebench_prompt(task, context, inp):
    if task == "passkey":
        return ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
                "I will quiz you about the important information.\n\n" + context + "\n\n" + inp + "\n\nThe pass key is")
    if task == "number_string":
        return ("There is an important info hidden inside a lot of irrelevant text. Find it. I will quiz you "
                "about the important information there.\n\n" + context + "\n\n" + inp + "\n\nThe sequence of digits is")
    if task == "kv_retrieval":
        return "Extract the value corresponding to the specified key in the JSON object below.\n\n" + context + "\n\n" + inp
    raise ValueError(task)


# ---- RULER (datasets/ruler.cc) ----
RULER_TASKS = {
    "niah_single_1": ("noise", "words", "numbers", 1, 1, 1),
    "niah_single_2": ("essay", "words", "numbers", 1, 1, 1),
    "niah_single_3": ("essay", "words", "uuids", 1, 1, 1),
    "niah_multikey_1": ("essay", "words", "numbers", 4, 1, 1),
    "niah_multikey_2": ("needle", "words", "numbers", 1, 1, 1),
    "niah_multikey_3": ("needle", "uuids", "uuids", 1, 1, 1),
    "niah_multivalue": ("essay", "words", "numbers", 1, 4, 1),
    "niah_multiquery": ("essay", "words", "numbers", 1, 1, 4),
}


def _reword(task, tmpl):
    _, _, value_type, _, v, q = RULER_TASKS[task]
    type_name = value_type
    if q * v == 1:
        tmpl = tmpl.replace("Some", "A").replace("are all", "is").replace("are", "is").replace("answers", "answer")
        type_name = type_name[:-1]
    return tmpl.replace("{type}", type_name)


def ruler_needle(task, key, value):
    return f"One of the special magic {RULER_TASKS[task][2]} for {key} is: {value}."


def ruler_query(keys):
    if len(keys) == 1:
        return keys[0]
    if len(keys) == 2:
        return f"{keys[0]} and {keys[1]}"
    return ", ".join(keys[:-1]) + ", and " + keys[-1]


def ruler_task_prompt(task, context, query):
    t = _reword(task, "Some special magic {type} are hidden within the following text. Make sure to memorize it. "
                      "I will quiz you about the {type} afterwards.\n{context}\nWhat are all the special magic {type} "
                      "for {query} mentioned in the provided text?")
    return t.replace("{query}", query).replace("{context}", context)


def ruler_answer_prefix(task, query):
    return _reword(task, " The special magic {type} for {query} mentioned in the provided text are").replace("{query}", query)


# ---- Classic needle-in-a-haystack (datasets/niah.cc) ----
NIAH_NEEDLE = "\nThe best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day.\n"
NIAH_QUESTION = "What is the best thing to do in San Francisco?"
NIAH_SYSTEM = "You are a helpful AI bot that answers questions for a user. Keep your response short and direct"


def niah_user(context, question):
    return ("<context>\n" + context + "\n</context>\n\n" + question +
            " Don't give information outside the document or repeat your findings")


def niah_prompt(context, question):
    return NIAH_SYSTEM + "\n\nHuman: " + niah_user(context, question) + \
        "\n\nAssistant: Here is the most relevant sentence in the context:"


def golden():
    """Fixed inputs through every template, for the cross-language test."""
    g = {
        "noise_line": NOISE_LINE,
        "passkey_needle": passkey_needle("04213"),
        "number_string_needle": number_string_needle("3000077442"),
        "kv_context": kv_context([("a-1", "b-2"), ("c-3", "d-4")]),
        "kv_input": kv_input("a-1"),
        "niah_prompt": niah_prompt("CTX", NIAH_QUESTION),
        "niah_needle": NIAH_NEEDLE,
        "ruler_query_4": ruler_query(["k1", "k2", "k3", "k4"]),
    }
    for task in ("passkey", "number_string"):
        g["ib_prompt_" + task] = infinitebench_prompt(task, "CTX", infinitebench_question(task))
    g["ib_prompt_kv_retrieval"] = infinitebench_prompt("kv_retrieval", "CTX", kv_input("a-1"))
    for task in RULER_TASKS:
        g["ruler_prompt_" + task] = ruler_task_prompt(task, "CTX", "tart-eyebrow") + ruler_answer_prefix(task, "tart-eyebrow")
        g["ruler_needle_" + task] = ruler_needle(task, "tart-eyebrow", "4916237")
    return g


if __name__ == "__main__":
    if sys.argv[1:] == ["--golden"]:
        json.dump(golden(), sys.stdout, ensure_ascii=False)
    else:
        print(__doc__)
