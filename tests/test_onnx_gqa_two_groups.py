"""The building block of mixed batches (issue 15, not built yet): ONE ONNX Runtime graph with two
com.microsoft GroupQueryAttention nodes over one KV pool, in place through IO binding — decode
rows (B_d x 1 token, different past lengths) over slots [0, B_d) and a prompt chunk (1 x T tokens
after a past) over another slot. GQA refuses B > 1 x T > 1 with a past in one node, so a mixed
engine call needs one node per group; this checks that two such nodes on views of the same
buffers give numpy's attention and write each row's keys and values in place."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

NH, HS, MAX, SLOTS = 2, 8, 64, 4
C = NH * HS


def two_group_graph() -> bytes:
    nodes, inputs, outputs = [], [], []
    for g, rows, tokens in (("d", "B", 1), ("p", 1, "T")):
        names = [f"{n}_{g}" for n in ("q", "k", "v", "past_k", "past_v", "seqlens", "total")]
        nodes.append(helper.make_node("GroupQueryAttention", names, [f"y_{g}", f"present_k_{g}", f"present_v_{g}"],
                                      domain="com.microsoft", num_heads=NH, kv_num_heads=NH))
        inputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, [rows, tokens, C]) for n in names[:3]]
        inputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, [rows, NH, MAX, HS]) for n in names[3:5]]
        inputs += [helper.make_tensor_value_info(names[5], TensorProto.INT32, [rows]),
                   helper.make_tensor_value_info(names[6], TensorProto.INT32, [])]
        outputs += [helper.make_tensor_value_info(f"y_{g}", TensorProto.FLOAT, [rows, tokens, C])]
        outputs += [helper.make_tensor_value_info(f"present_{n}_{g}", TensorProto.FLOAT, [rows, NH, MAX, HS])
                    for n in "kv"]
    graph = helper.make_graph(nodes, "two_groups", inputs, outputs)
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets).SerializeToString()


def attention(q, k, v, keys, values, past):
    """numpy: row's (T, C) q/k/v after `past` cached positions of keys/values (nh, MAX, hs)."""
    T = len(q)
    keys, values = keys.copy(), values.copy()
    keys[:, past:past + T] = k.reshape(T, NH, HS).transpose(1, 0, 2)
    values[:, past:past + T] = v.reshape(T, NH, HS).transpose(1, 0, 2)
    qh = q.reshape(T, NH, HS).transpose(1, 0, 2)
    y = np.zeros((NH, T, HS), np.float32)
    for t in range(T):
        n = past + t + 1
        w = qh[:, t:t + 1] @ keys[:, :n].transpose(0, 2, 1) / np.sqrt(HS)
        w = np.exp(w - w.max(-1, keepdims=True))
        y[:, t] = ((w / w.sum(-1, keepdims=True)) @ values[:, :n])[:, 0]
    return y.transpose(1, 0, 2).reshape(T, C), keys, values


def test_two_gqa_nodes_run_decode_rows_and_a_prompt_chunk_in_place_over_one_pool():
    session = ort.InferenceSession(two_group_graph(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    keys, values = (rng.standard_normal((SLOTS, NH, MAX, HS)).astype(np.float32) for _ in range(2))
    before = keys.copy(), values.copy()
    past_d, slot_p, past_p, T = np.array([7, 12, 3]), 3, 9, 5
    B = len(past_d)
    fresh = {g: [rng.standard_normal(shape).astype(np.float32) for _ in range(3)]
             for g, shape in (("d", (B, 1, C)), ("p", (1, T, C)))}
    io = session.io_binding()
    for g, (q, k, v) in fresh.items():
        for name, a in zip(("q", "k", "v"), (q, k, v)):
            io.bind_input(f"{name}_{g}", "cpu", 0, np.float32, list(a.shape), a.ctypes.data)
    views = {"d": slice(0, B), "p": slice(slot_p, slot_p + 1)}
    for g, rows in views.items():
        for name, pool in (("k", keys), ("v", values)):
            view = pool[rows]
            io.bind_input(f"past_{name}_{g}", "cpu", 0, np.float32, list(view.shape), view.ctypes.data)
            io.bind_output(f"present_{name}_{g}", "cpu", 0, np.float32, list(view.shape), view.ctypes.data)
    io.bind_cpu_input("seqlens_d", past_d.astype(np.int32))  # past + 1 - 1
    io.bind_cpu_input("total_d", np.array(past_d.max() + 1, np.int32))
    io.bind_cpu_input("seqlens_p", np.array([past_p + T - 1], np.int32))
    io.bind_cpu_input("total_p", np.array(past_p + T, np.int32))
    io.bind_output("y_d")
    io.bind_output("y_p")
    session.run_with_iobinding(io)
    y = {g: out.numpy() for g, out in zip("dp", io.get_outputs()[-2:])}
    for g, slots, pasts in (("d", range(B), past_d), ("p", [slot_p], [past_p])):
        for i, (slot, past) in enumerate(zip(slots, pasts)):
            q, k, v = (a[i] for a in fresh[g])
            want_y, want_k, want_v = attention(q, k, v, before[0][slot], before[1][slot], int(past))
            np.testing.assert_allclose(y[g][i], want_y, atol=1e-5)
            np.testing.assert_allclose(keys[slot], want_k, atol=0)  # written in place, nothing else touched
            np.testing.assert_allclose(values[slot], want_v, atol=0)
