"""gqlm's SOAP against an independent float64 PyTorch implementation (tests/soap_reference_torch.py).

Initial eigenbases: a statistic built from one gradient is rank-deficient when its side is longer
than the rest of the gradient (7x13's right side, the merged 12-wide side of the 4x3x5 tensor, a
preconditioned bias). Its null-space eigenvectors are arbitrary, so after the first call we copy
the PyTorch basis into gqlm's state for exactly those statistics (a shared basis); full-rank
initial bases are compared up to column signs, which SOAP's update does not depend on. By the
first refresh (step 3, four gradients) every statistic is full rank, and from then on both sides
compute their bases independently. The 64x3 matrix keeps its 64-side above max_precond_dim=32
(identity there): a 64-wide statistic would stay rank-deficient for 21 gradients, so its QR
refreshes would be just as arbitrary.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gqlm.optim import soap as soap_lib

torch = pytest.importorskip("torch")
from tests.soap_reference_torch import ReferenceSOAP  # noqa: E402

pytestmark = pytest.mark.parity

SHAPES = {"square": (16, 16), "wide": (7, 13), "tall": (64, 3), "bias": (3,), "tensor": (4, 3, 5)}
CONFIGS = {
    "plain": dict(merge_dims=False, precondition_1d=False, normalize_grads=False, shampoo_beta=-1),
    "merged_1d": dict(merge_dims=True, precondition_1d=True, normalize_grads=False, shampoo_beta=-1),
    "normalized": dict(merge_dims=False, precondition_1d=False, normalize_grads=True, shampoo_beta=0.9),
}


@pytest.fixture
def x64():
    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", False)


def _rank_deficient(work_shape, k):
    return work_shape[k] > int(np.prod(work_shape)) // work_shape[k] or len(work_shape) == 1


@pytest.mark.parametrize("name", list(CONFIGS))
def test_soap_matches_reference(x64, name):
    opts = CONFIGS[name]
    b1, b2, eps, wd, freq, max_dim = 0.9, 0.95, 1e-8, 0.1, 3, 32
    def lr(count):  # a float64 schedule, so both sides see the same learning rates
        return 0.03 - 0.0005 * jnp.asarray(count, jnp.float64)

    rng = np.random.default_rng(0)
    init = {k: rng.normal(size=s) for k, s in SHAPES.items()}
    noise = [{k: rng.normal(size=s) for k, s in SHAPES.items()} for _ in range(31)]

    tx = soap_lib.soap(lr, b1=b1, b2=b2, eps=eps, weight_decay=wd, precondition_frequency=freq,
                       max_precond_dim=max_dim, linalg_dtype=jnp.float64, **opts)
    params = {k: jnp.asarray(v) for k, v in init.items()}
    state = tx.init(params)
    update = jax.jit(tx.update)

    tparams = {k: torch.nn.Parameter(torch.tensor(v)) for k, v in init.items()}
    ref = ReferenceSOAP(list(tparams.values()), lr=0.0, betas=(b1, b2), eps=eps, weight_decay=wd,
                        precondition_frequency=freq, max_precond_dim=max_dim, **opts)

    for call, z in enumerate(noise):
        grads = {k: z[k] + 0.5 * params[k] for k in SHAPES}
        updates, state = update(grads, state, params)
        params = optax.apply_updates(params, updates)
        for k, p in tparams.items():
            p.grad = torch.tensor(z[k]) + 0.5 * p.detach()
        ref.param_groups[0]["lr"] = 0.03 - 0.0005 * call
        ref.step()

        if call == 0:
            state = _share_initial_bases(state, ref, tparams)
            for k in SHAPES:  # the initialising call leaves parameters untouched
                np.testing.assert_array_equal(np.asarray(params[k]), init[k])

    assert int(state.soap.count) == len(noise) - 1
    for k in SHAPES:
        np.testing.assert_allclose(np.asarray(params[k]), tparams[k].detach().numpy(),
                                   rtol=0, atol=1e-10, err_msg=k)
        assert not np.allclose(np.asarray(params[k]), init[k], atol=1e-3)  # really moved


def _share_initial_bases(state, ref, tparams):
    """Copy the reference's basis where it is not unique; elsewhere check it agrees up to signs."""
    precond = dict(state.soap.precond)
    for k, p in tparams.items():
        ts = ref.state[p]
        pc = precond[k]
        bases = list(pc.bases)
        for i, (q_ref, q) in enumerate(zip(ts["Q"], pc.bases)):
            assert (q_ref is None) == (q is None), (k, i)
            if q is None:
                continue
            q_ref = q_ref.numpy()
            if _rank_deficient(ts["work_shape"], i):
                bases[i] = jnp.asarray(q_ref)
            else:
                np.testing.assert_allclose(np.abs(np.asarray(q).T @ q_ref), np.eye(len(q_ref)),
                                           atol=1e-8, err_msg=f"{k} basis {i}")
        precond[k] = dataclasses.replace(pc, bases=tuple(bases))
    return state._replace(soap=state.soap._replace(precond=precond))
