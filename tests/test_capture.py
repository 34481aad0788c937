"""The fixed-shape decode step at the 7B's shapes, checked on the meta device without a GPU: no host
sync, host data or CPU tensor inside the step a CUDA graph captures (the CPU checks of
tests/test_decode.py cannot see .cpu(), .tolist() or .numpy() on CPU tensors: those never reach the
dispatcher)."""
import torch

import generation
from test_decode import HOST_OPS

HOST_CALLS = {"tolist", "numpy", "item", "cpu", "__bool__", "__int__", "__index__", "__float__", "__array__"}


def host_access(fn) -> list:
    """What fn() does that a CUDA graph cannot capture, run on meta tensors: an op on a tensor that is
    not on the meta device (a CPU tensor made or read inside the step: host data), an op that needs a
    host value (HOST_OPS), and a call that reads a tensor on the host (.cpu(), .tolist(), .numpy(),
    .item(), bool(), int()): a __torch_function__ mode sees those before the dispatcher (on CPU
    tensors they never reach it: the blind spot of ops_of)."""
    from torch.overrides import TorchFunctionMode
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves
    found = []

    class Calls(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            name = getattr(func, "__name__", "")
            to_host = name == "to" and any(isinstance(a, (str, torch.device)) and torch.device(a).type != "meta"
                                           for a in list(args[1:]) + list((kwargs or {}).values()))
            if name in HOST_CALLS or to_host:
                found.append(f"call {name}")
            return func(*args, **(kwargs or {}))

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func._schema.name.split("::")[-1]
            if name in HOST_OPS:
                found.append(f"op {name}")
            out = func(*args, **(kwargs or {}))
            devices = {t.device.type for t in tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)}
            if devices - {"meta"}:
                found.append(f"op {name} on {sorted(devices - {'meta'})}")
            return out
    try:
        with Calls(), Ops():
            fn()
    except (RuntimeError, NotImplementedError, TypeError) as e:  # meta tensors have no data to read
        found.append(f"raised {type(e).__name__}: {str(e).splitlines()[0][:80]}")
    return found


def test_the_7b_shaped_step_on_the_meta_device_touches_no_host_data():
    """StaticStep.run() at the 7B's shapes (hidden 4096, 32 heads, ffn 11008, the released config's
    vocabulary of 50,304 with EOS 50279 and pad 1; 2 of its 32 layers), on the meta device: no
    memory, and any host sync, host data or CPU tensor inside the step is found (host_access), which
    would make a CUDA capture fail and the 7B's scoring decode eagerly. The check itself finds each
    kind when one is put into the step."""
    from transformers import AutoModelForCausalLM, OlmoConfig
    import memory
    config = OlmoConfig(**{**memory.OLMO_CONFIGS["olmo-7b"], "num_hidden_layers": 2}, pad_token_id=1,
                        eos_token_id=50279, bos_token_id=None)
    meta = torch.device("meta")
    with meta:
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    S, C = 32, generation.capacity(64, 256, generation.ROUND_TO)
    st = generation.StaticStep(model, S, C, meta)
    for _ in range(config.num_hidden_layers):  # the cache enter() gives a step: every row's K and V buffers
        layer, shape = st.cache.layer_class_to_replicate(), (S, config.num_key_value_heads, C, 128)
        layer.hold(torch.zeros(shape, dtype=torch.bfloat16, device=meta), torch.zeros(shape, dtype=torch.bfloat16,
                   device=meta), C)
        st.cache.layers.append(layer)
    with torch.inference_mode():
        assert host_access(st.run) == []
        assert st.nxt.shape == (S,) and st.nxt.device == meta
        run = st.run
        for put, seen in ((lambda: st.slot.cpu(), "call cpu"), (lambda: st.nxt.tolist(), "call tolist"),
                          (lambda: st.nxt.numpy(), "call numpy"), (lambda: int(st.pos.max()), "call __int__"),
                          (lambda: st.pos + torch.tensor([1]), "on ['cpu']"), (lambda: st.ids.to("cpu"), "call to"),
                          (lambda: st.mask.nonzero(), "op nonzero")):
            st.run = lambda put=put: (run(), put())
            found = host_access(st.run)
            assert any(seen in f for f in found), (seen, found)
