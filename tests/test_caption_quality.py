import pytest

from pipeline.config import RecaptionConfig, pick
from pipeline.core.caption_quality import CaptionLimits, caption_problem, repeated_ngram

LIMITS = pick(CaptionLimits, RecaptionConfig())
GOOD = (
    "A red double-decker bus drives along a wet city street in the evening. Its headlights are on and "
    "a few people with black umbrellas wait at a glass bus stop on the left side of the road."
)


@pytest.mark.parametrize(
    "text, finish_reason, reason",
    [
        (GOOD, "stop", None),
        ("", "stop", "empty_output"),
        ("   \n ", "stop", "empty_output"),
        (GOOD, "length", "truncated"),
        ("A red bus on a street.", "stop", "too_short"),
        ("A cat sitting on a mat. " + "the cat the cat the cat the cat the cat", "stop", "degenerate"),
        ("A large brown dog is lying on the grass and the dog is very very very very happy today.", "stop", "degenerate"),
        ("A photo of a beach with sand and waves " + "!" * 30, "stop", "degenerate"),
        (
            "There is a tree and there is a car and there is a tree and there is a car and there is a house "
            "and there is a tree and there is a car and there is a tree",
            "stop",
            "degenerate",
        ),
        ("一只棕色的狗躺在绿色的草地上，旁边有一个红色的球和一个蓝色的碗，阳光明媚，背景是树木和房子。", "stop", "not_english"),
        ("Un grand chien brun est couché sur l'herbe verte près d'une balle rouge et d'un bol bleu sous le soleil.", "stop", "not_english"),
        ("Ein großer brauner Hund liegt auf dem grünen Gras neben einem roten Ball und einer blauen Schüssel.", "stop", "not_english"),
    ],
    ids=["good", "empty", "whitespace", "cut-off", "too-short", "bigram-loop", "unigram-loop", "char-run", "low-diversity", "chinese", "french", "german"],
)
def test_hand_written_outputs_get_the_right_reason(text, finish_reason, reason):
    problem = caption_problem(text, finish_reason, LIMITS)
    assert (problem[0] if problem else None) == reason
    if problem:
        assert problem[1]


def test_repeated_ngram_finds_the_loop():
    assert repeated_ngram("a b c d c d c d c d e".split(), 4) == "c d"
    assert repeated_ngram("a b c d e f".split(), 2) is None
