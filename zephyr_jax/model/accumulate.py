"""Gradient accumulation without a second gradient tree: a layer scan whose backward adds into a running sum.

With plain `jax.grad` each micro-batch's gradient is a whole new float32 tree, added to the running sum after
the backward pass: two trees at once (2 x 27 GiB at 7B). Here the decoder stack's backward pass is written out
(one reverse scan over the layers) and adds each layer's parameter gradient into the running sum, in place, as
soon as it is computed. The custom VJP hands back that sum as the stacked parameters' gradient, so
`jax.grad` of a micro-batch's loss returns running sum + this micro-batch's gradient for the layers, and only
one layer's gradient exists beside the sum.

The forward pass keeps each layer's input and the backward recomputes the layer before differentiating it, so
it costs what `remat="full"` does, whatever the model's remat policy says.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def scan_layers_into(graphdef, stacked, running_sum, x, cos, sin, segment_ids, max_segments=None, unroll=False):
    """The decoder stack's output for input x (as run_layers), differentiable in `stacked` only: the gradient
    for `stacked` is `running_sum` (a tree like it) plus this call's gradient, added layer by layer in place."""

    def layer(state, h):
        return nnx.merge(graphdef, state)(h, cos, sin, segment_ids, None, max_segments)[0]

    @jax.custom_vjp
    def run(stacked, running_sum, x):
        return jax.lax.scan(lambda h, state: (layer(state, h), None), x, stacked, unroll=unroll)[0]

    def forward(stacked, running_sum, x):
        out, inputs = jax.lax.scan(lambda h, state: (layer(state, h), h), x, stacked, unroll=unroll)
        return out, (stacked, running_sum, inputs)

    def backward(saved, d_out):
        stacked, running_sum, inputs = saved

        def body(carry, per_layer):
            d_h, running_sum = carry
            i, state, h = per_layer
            if unroll:  # straight-line code: XLA's CSE would merge the recompute into the forward (all kept),
                # and its scheduler would start this layer's recompute before the layer above has added its
                # weight gradients (two layers' activations live): the recompute waits for the running sum
                state, h, d_h, running_sum = jax.lax.optimization_barrier((state, h, d_h, running_sum))
            d_state, d_h = jax.vjp(layer, state, h)[1](d_h)  # the layer recomputed, then differentiated
            add = lambda total, d: jax.lax.dynamic_update_index_in_dim(
                total, jax.lax.dynamic_index_in_dim(total, i, keepdims=False) + d.astype(total.dtype), i, 0)
            return (d_h, jax.tree.map(add, running_sum, d_state)), None

        layers = jax.tree.leaves(stacked)[0].shape[0]
        (d_x, total), _ = jax.lax.scan(body, (d_out, running_sum), (jnp.arange(layers), stacked, inputs),
                                       reverse=True, unroll=unroll)
        return total, None, d_x  # the running sum is not differentiated

    run.defvjp(forward, backward)
    return run(stacked, running_sum, x)
