"""Per-example dropout masks: flax's Dropout semantics, and masks that do not depend on how the batch is split."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fastgpu_jax.nn.per_example import per_example_dropout

KEY = jax.random.key(0)


class Net(nn.Module):
    rate: float = 0.5
    broadcast_dims: tuple = ()

    @nn.compact
    def __call__(self, x, train=True):
        x = nn.Dropout(self.rate, broadcast_dims=self.broadcast_dims, deterministic=not train)(x)
        return nn.Dropout(self.rate, deterministic=not train)(x * 2.0)  # a second layer: its own key


def _apply(model, x, ids, key=KEY, **kwargs):
    with per_example_dropout(jnp.asarray(ids, jnp.int32)):
        return model.apply({}, x, rngs={"dropout": key}, **kwargs)


def test_rows_draw_the_same_mask_however_the_batch_is_split():
    x = jnp.ones((8, 6, 5))
    whole = _apply(Net(), x, np.arange(8))
    parts = [_apply(Net(), x[i:i + n], np.arange(i, i + n)) for i, n in ((0, 2), (2, 2), (4, 4))]
    np.testing.assert_array_equal(np.concatenate(parts), whole)
    # and a row's mask depends on its global index, not its position: rows 0 and 1 differ
    assert not np.array_equal(whole[0], whole[1])


def test_keeps_flax_semantics():
    x = jnp.ones((64, 32, 16))
    y = np.asarray(_apply(Net(rate=0.25), x, np.arange(64)))
    keep = 0.75
    np.testing.assert_allclose(np.unique(y), [0.0, 2.0 / keep ** 2], rtol=1e-6)  # inverted dropout, as flax
    assert abs(np.mean(y != 0) - keep ** 2) < 0.01  # two layers, each keeps 3/4
    np.testing.assert_array_equal(_apply(Net(), x, np.arange(64), train=False), 2.0 * x)  # deterministic
    assert not np.any(_apply(Net(rate=1.0), x, np.arange(64)))
    # a different step key draws different masks
    assert not np.array_equal(y, _apply(Net(rate=0.25), x, np.arange(64), key=jax.random.key(1)))


def test_broadcast_dims_share_one_mask_along_them():
    class One(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dropout(0.5, broadcast_dims=(1,), deterministic=False)(x)

    y = np.asarray(_apply(One(), jnp.ones((4, 10, 16)), np.arange(4)))
    assert np.all(y == y[:, :1, :])
    assert np.all(y.mean(axis=(1, 2)) < 2.0)  # each row still drops something


def test_inputs_without_a_row_per_example_fall_back_to_one_draw_per_device():
    class Flat(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dropout(0.5, deterministic=False)(x.reshape(-1))

    x = jnp.ones((4, 8))
    a, b = (np.asarray(_apply(Flat(), x, np.arange(i, i + 4))) for i in (0, 4))
    assert a.shape == (32,) and not np.array_equal(a, b)  # devices (offsets 0 and 4) draw independently


def test_mask_is_the_same_under_jit_and_vmap_free_eager():
    x = jnp.ones((8, 16))
    ids = np.arange(8)
    eager = _apply(Net(), x, ids)
    jitted = jax.jit(lambda x: _apply(Net(), x, ids))(x)
    np.testing.assert_array_equal(eager, jitted)


@pytest.mark.parametrize("deterministic", [True, False])
def test_call_argument_overrides_attribute(deterministic):
    class Call(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dropout(0.5)(x, deterministic=deterministic)

    y = _apply(Call(), jnp.ones((4, 8)), np.arange(4))
    assert np.array_equal(y, jnp.ones((4, 8))) == deterministic
