"""mesh: the tensor-parallel size is checked against the world before any process starts."""

from __future__ import annotations

import pytest

from lightning_d2ft.parallel.mesh import check_tensor_parallel_size, tensor_parallel_size_for


def test_auto_takes_every_rank_and_a_divisor_is_kept():
    assert tensor_parallel_size_for(4, "auto") == 4
    assert tensor_parallel_size_for(4, 2) == 2


def test_a_size_that_does_not_divide_the_world_lists_the_divisors():
    with pytest.raises(ValueError, match=r"tensor_parallel_size=3 does not divide the 4 devices.*\[1, 2, 4\]"):
        tensor_parallel_size_for(4, 3)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "all"])
def test_a_size_that_is_not_a_positive_int_or_auto_is_refused(bad):
    with pytest.raises(ValueError, match="tensor_parallel_size must be a positive int or 'auto'"):
        check_tensor_parallel_size(bad)
