"""condfx.codegen.triton: Triton lowerings of ``condfx`` custom ops, one op family per module.

* ``attention``: ``_attention_fwd_kernel`` / ``attention_fwd`` for ``condfx::attention`` and
  ``routed_attention_fwd`` for ``condfx::routed_attention``; call
  ``condfx.codegen.triton.attention.register()`` to make them the ops' CUDA kernels.

Nothing is imported or registered here, so importing this package needs no Triton.
"""
