"""Inline sample text for the tests: English prose, Korean sentences, emoji (ZWJ sequences, flags,
skin tones), Python code with tabs, CRLF and whitespace runs, and numbers."""

from __future__ import annotations

import random

ENGLISH = [
    "The quick brown fox jumps over the lazy dog.",
    "It's a truth universally acknowledged that they'll say we've done what you'd expect.",
    "She sells sea shells by the sea shore; the shells she sells are surely sea shells!",
    "In 1969, 600 million people watched the landing -- roughly 1/5 of humanity.",
    "WHY ARE YOU SHOUTING?  I'm not shouting, I'm   emphasising.",
    "Tokenizers split text into pieces, then merge the most frequent adjacent pairs of bytes.",
]
KOREAN = [
    "영화 정말 재밌어요 ㅋㅋㅋㅋㅋㅋ 강추합니다!",
    "배우들의 연기가 너무 좋았고 음악도 훌륭했다.",
    "이 영화는 시간 낭비였습니다... 다시는 안 봐요 ㅠㅠ",
    "오늘 날씨가 맑아서 한강 공원에 산책하러 갔어요.",
    "한국어 형태소 분석은 어렵지만 재미있다. 1234원짜리 커피 ☕ 마심",
]
EMOJI = [
    "🙂🙂🙂 great!",
    "family: 👨\u200d👩\u200d👧\u200d👦 and 👩\u200d💻 at work",
    "flags 🇰🇷🇺🇸 rainbow 🏳️\u200d🌈 thumbs 👍🏽👍🏿",
    "mixed 😀 text 🎉🎉 with ❤️ hearts ✨",
]
CODE = [
    "def add(x, y):\n    return x + y\n\n\nprint(add(40, 2))  \n",
    "class Point:\r\n\tdef __init__(self, x, y):\r\n\t\tself.x = x\r\n\t\tself.y = y\r\n",
    "for i in range(10):\n        if i % 2 == 0:\n            continue\n        total += i ** 2\n",
    "# " + "=" * 70 + "\n" + "x = {'a': [1, 2, 3], \"b\": None}   # comment\t\t\n",
    "if __name__ == '__main__':\n    main()\n\n\n\n    \n\t \n",
]


def mixed_documents(n: int = 250, seed: int = 0) -> list[str]:
    """``n`` documents mixing English, Korean, emoji (ZWJ sequences too), code and numbers."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        parts = []
        for _ in range(rng.randint(2, 6)):
            pool = rng.choice((ENGLISH, KOREAN, EMOJI, CODE))
            text = rng.choice(pool)
            if rng.random() < 0.3:
                words = text.split(" ")
                rng.shuffle(words)
                text = " ".join(words)
            parts.append(text)
        parts.append(f"#{i} costs {rng.randint(0, 10**6)}.{rng.randint(0, 99):02d} at {rng.random():.4f}")
        sep = rng.choice(("\n", " ", "\r\n", "\n\n", "  \t"))
        docs.append(sep.join(parts))
    return docs
