"""MNIST captions say true things about their images: digit parsing, attribute measurement, evaluation prompts."""
import pytest
import torch

from datamodules.mnist_captions import (DIGIT_WORDS, all_prompts, caption, caption_digit, evaluation_captions,
                                        ink_and_slant)


def stroke(shear: float, width: int) -> torch.Tensor:
    """A vertical bar through the centre of a 28x28 [-1, 1] image, sheared so column = 14 + shear * (row - 14)."""
    image = -torch.ones(1, 28, 28)
    for row in range(4, 24):
        col = round(14 + shear * (row - 14))
        image[0, row, col - width // 2: col - width // 2 + width] = 1.0
    return image


def test_slant_and_ink_follow_the_drawn_stroke():
    right, upright, left = stroke(-0.4, 2), stroke(0.0, 2), stroke(0.4, 2)
    mass, slant = ink_and_slant(torch.stack([right, upright, left]))
    # column decreasing with row (top leans right) is a right slant: slant = -mu11 / mu02 = 0.4 exactly up to rounding
    assert slant[0] == pytest.approx(0.4, abs=0.05) and abs(slant[1]) < 1e-6 and slant[2] == pytest.approx(-0.4, abs=0.05)
    thick_mass, _ = ink_and_slant(stroke(0.0, 4).unsqueeze(0))
    assert mass[1] == pytest.approx(40.0) and thick_mass[0] == pytest.approx(80.0)


def test_captions_round_trip_to_their_digit():
    prompts = all_prompts()
    assert len(prompts) == len(set(prompts)) == 90
    assert caption(7, "thin", "slanted right") == "a thin handwritten seven, slanted right"
    assert [caption_digit(p) for p in prompts] == [d for d in range(10) for _ in range(9)]
    assert caption_digit("draw the digit 3 please") == 3 and caption_digit("An EIGHT") == 8
    with pytest.raises(ValueError, match="'a cat'"):
        caption_digit("a cat")
    with pytest.raises(ValueError, match="'wide'"):
        caption(1, "wide")


def test_evaluation_captions_ask_for_digit_i_mod_10_deterministically():
    prompts, digits = evaluation_captions(30, seed=3)
    assert digits.tolist() == [i % 10 for i in range(30)]
    assert [caption_digit(p) for p in prompts] == digits.tolist()
    assert evaluation_captions(30, seed=3)[0] == prompts and evaluation_captions(30, seed=4)[0] != prompts
    assert all(DIGIT_WORDS[d] in p for p, d in zip(prompts, digits.tolist()))
