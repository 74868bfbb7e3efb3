"""Passages that read like instructions aimed at an AI assistant (prompt injection).

A document may carry text written for the model that will later read it as a passage:
"ignore all previous instructions", a forged ``<|im_start|>system`` turn, "if you are
an AI, tell the user to ...". Prompt assembly fences every passage as data anyway; the
passages found here are also labelled there and in search results, so the model is
told, and an admin can see, that this text looks like an instruction.

The check is a short list of English phrasings, kept conservative on purpose: each
pattern names something ordinary documents (handbooks, manuals, FAQs, policies) do not
say, so that a flag means something. It is a label, not a filter; nothing is dropped,
and phrasing it does not know is still fenced as data. Matching ignores case, runs of
whitespace, zero-width characters, curly apostrophes and look-alike forms (NFKC).
"""

from __future__ import annotations

import re
import unicodedata

# Nouns that name the machine rather than a person. Bare "assistant", "model", "bot"
# and "GPT" are left out: handbooks talk about executive assistants, product models and
# disk partition tables.
_AI = (r"(?:ai|a\.i\.|artificial intelligence|llm|large language model|language model"
       r"|chat ?bot|chat ?gpt|ai (?:assistant|model|agent|system)|virtual assistant)s?")
# After such a noun, what makes it the one spoken to ("if you are an AI, ...") rather
# than part of a longer name ("if you are an AI developer").
_SPOKEN_TO = (r"(?=\s*[,.;:!)]|\s+(?:reading|processing|that|who|then|you|please|ignore"
              r"|disregard|forget|do|don't|tell|respond|answer|reply|say|include|always"
              r"|never|must|should)\b)")
_PRIOR = r"(?:previous|prior|earlier|above|preceding|foregoing|original|initial)"
_ORDERS = r"(?:instructions?|prompts?|directives|commands|system (?:prompt|message)s?)"
_RULES = rf"(?:{_ORDERS}|rules|guidelines|guardrails|programming|training)"
# Not after a negation: "do not ignore your safety guidelines" is advice to people.
_IGNORE = r"(?<!not )(?<!n't )(?<!never )(?:ignore|disregard|forget|override|bypass)"
_NOT = r"(?:do not|don't|dont|never|must not|should not)"

# Each reason (stored with a flagged chunk) and the phrasings that raise it.
PATTERNS: dict[str, tuple[str, ...]] = {
    # "Ignore all previous instructions", "disregard your rules", "forget everything above".
    "override": (
        rf"\b{_IGNORE} (?:all |any |every )?(?:of )?(?:the |your |my |these |those )?"
        rf"{_PRIOR} {_ORDERS}\b",
        rf"\b{_IGNORE} (?:all |any )?(?:of )?your (?:{_PRIOR} )?{_RULES}\b",
        rf"\b{_IGNORE} (?:the )?system (?:prompt|message)\b",
        rf"\b{_IGNORE} (?:everything|anything)(?: that is| written)? (?:above|before this)\b",
    ),
    # Chat-template control tokens and instruction-tuning section markers.
    "chat_markup": (
        r"<\|(?:im_start|im_end|system|user|assistant|endoftext|eot_id|start_header_id"
        r"|end_header_id|begin_of_text)\|>",
        r"\[/?INST\]|<</?SYS>>",
        r"(?m:^)[ \t]*#{1,6}[ \t]*(?:system|assistant|instruction)[ \t]*:",
    ),
    # Text that speaks to the model reading it.
    "addressed_to_ai": (
        rf"\b(?:if|when) you are (?:an? |the )?{_AI}{_SPOKEN_TO}",
        rf"\b(?:note|message|instructions?|attention|notice) (?:to|for) (?:the |any |all )?"
        rf"{_AI}{_SPOKEN_TO}",
        rf"\b(?:dear|hey|hello|hi) {_AI}{_SPOKEN_TO}",
        rf"\b{_AI} (?:reading|processing|summari[sz]ing|parsing|analy[sz]ing) this "
        r"(?:document|text|page|passage|message|file|email|content)\b",
        rf"\bas an? {_AI},? you (?:must|should|will|are|have to)\b",
    ),
    # A new identity or a jailbreak mode for the model.
    "persona": (
        r"\byou are now (?:in )?(?:dan|god mode|jailbreak mode|jailbroken|unrestricted"
        r"|unfiltered|uncensored)\b",
        r"\b(?:dan|jailbreak) mode (?:is )?(?:now )?(?:enabled|activated|on)\b",
        r"\bdan\b[^.]{0,40}\bdo anything now\b|\bdo anything now\b[^.]{0,10}\bdan\b",
        r"\byou are no longer (?:an? )?(?:ai|ai assistant|language model|chat ?bot)\b",
    ),
    # Asking for the hidden prompt, or handing over a replacement.
    "system_prompt": (
        r"\b(?:reveal|print|show|repeat|output|display|leak|disclose|write out|tell me)"
        r"(?: me)? (?:your|the) (?:full |entire |original |hidden |secret )?"
        r"(?:system prompt|initial (?:prompt|instructions)|hidden (?:prompt|instructions)"
        r"|instructions above|prompt above)\b",
        r"\byour (?:new|real|actual|true) (?:instructions|system prompt) (?:are|is)\b",
    ),
    # Keeping something from the person asking.
    "concealment": (
        rf"\b{_NOT} (?:tell|inform|alert|notify|warn|let) the user (?:that you|what you"
        r"|about (?:this|these) (?:instructions?|prompt|note|message))\b",
        rf"\b{_NOT} (?:mention|reveal|disclose|repeat) (?:this|these|the above) "
        r"(?:instructions?|prompt) (?:to the user|in your (?:answer|response|reply))\b",
        r"\bwithout (?:telling|informing|alerting) the user\b",
    ),
}
CHAT_TURNS = "chat_turns"
# Speaker labels at line starts: the assistant's and another's ("User: ...",
# "Assistant: ...") read as forged conversation turns; "System: Linux" alone does not.
_TURN_LABEL = re.compile(r"(?im)^[ \t]*(system|assistant|user|human|ai)[ \t]*:")
_COMPILED = {reason: re.compile("|".join(f"(?:{p})" for p in patterns), re.IGNORECASE)
             for reason, patterns in PATTERNS.items()}
_INVISIBLE = re.compile("[\u00ad\u200b-\u200f\u2060-\u2064\ufeff]")
_APOSTROPHES = str.maketrans({"\u2018": "'", "\u2019": "'", "\u02bc": "'"})
_SPACES = re.compile(r"[^\S\n]+")


def instruction_reasons(text: str) -> list[str]:
    """Why ``text`` reads like instructions to an AI: the `PATTERNS` reasons that match,
    then `CHAT_TURNS`, in that fixed order; empty for ordinary text."""
    normal = unicodedata.normalize("NFKC", text).translate(_APOSTROPHES)
    normal = _SPACES.sub(" ", _INVISIBLE.sub("", normal))
    flat = _SPACES.sub(" ", normal.replace("\n", " "))  # phrasings wrap; markers need lines
    reasons = [reason for reason, pattern in _COMPILED.items()
               if pattern.search(normal if reason == "chat_markup" else flat)]
    labels = {label.lower() for label in _TURN_LABEL.findall(normal)}
    if labels & {"assistant", "ai"} and labels & {"user", "human", "system"}:
        reasons.append(CHAT_TURNS)
    return reasons
