"""Expert-choice SwiGLU experts as one autograd function with a hand-written backward.

The maths is the plain composition
    x = hidden[rows];  act = silu(x @ W_gate^T) * (x @ W_up^T);  y = gate * (act @ W_down^T)
    out = scatter-add of y into the token rows,
but autograd's version of it allocates about 18 activation-sized tensors per forward and
backward (each SwiGLU product and its gradients, the gate-up `cat`). On CPU a fresh large
tensor costs more in page faults than the arithmetic that fills it, so this version
allocates 9, writes the gate and up gradients straight into one buffer, and skips the weight
gradients of frozen experts. Why it matters: it is what makes expert choice's dispatch
cheap enough to beat token choice on CPU (benchmarks/moe_layer.py).
"""

import torch
import torch.nn.functional as F


class ExpertChoiceSwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, flat_hidden, rows, gates, gate_up_proj, down_proj, compute_dtype):
        """flat_hidden [T, H]; rows [E*N] (expert-major token rows); gates [E, N];
        gate_up_proj [E, 2I, H]; down_proj [E, H, I] -> [T, H] in flat_hidden's dtype."""
        E, H = gate_up_proj.shape[0], flat_hidden.shape[-1]
        w_gate_up, w_down = gate_up_proj.to(compute_dtype), down_proj.to(compute_dtype)
        x = flat_hidden.index_select(0, rows).view(E, -1, H).to(compute_dtype)
        gate_up = torch.bmm(x, w_gate_up.transpose(1, 2))
        g, u = gate_up.chunk(2, dim=-1)
        act = F.silu(g).mul_(u)
        y = torch.bmm(act, w_down.transpose(1, 2)).mul_(gates.unsqueeze(-1).to(compute_dtype))
        out = flat_hidden.new_zeros(flat_hidden.shape).index_add_(0, rows, y.view(-1, H).to(flat_hidden.dtype))
        ctx.save_for_backward(rows, gates, x, gate_up, act, w_gate_up, w_down)
        ctx.dtypes = (flat_hidden.dtype, gate_up_proj.dtype, down_proj.dtype)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        rows, gates, x, gate_up, act, w_gate_up, w_down = ctx.saved_tensors
        hidden_dtype, gate_up_dtype, down_dtype = ctx.dtypes
        need_hidden, _, need_gates, need_gate_up, need_down, _ = ctx.needs_input_grad
        E, N, H = x.shape
        with torch.autocast(grad_out.device.type, enabled=False):
            gate_col = gates.unsqueeze(-1).to(x.dtype)
            dy = grad_out.index_select(0, rows).view(E, N, H).to(x.dtype)
            d_act = torch.bmm(dy, w_down)  # the gradient of act before the gate
            d_gate_up = torch.empty_like(gate_up)
            d_g, d_u = d_gate_up.chunk(2, dim=-1)
            g, u = gate_up.chunk(2, dim=-1)
            d_gates = torch.mul(d_act, act, out=d_g).sum(-1) if need_gates else None  # d_g is scratch here
            d_act.mul_(gate_col)
            torch.ops.aten.silu.out(g, out=d_u)
            d_u.mul_(d_act)
            torch.mul(d_act, u, out=d_g)
            torch.ops.aten.silu_backward.grad_input(d_g, g, grad_input=d_g)
            d_down = torch.bmm(dy.mul_(gate_col).transpose(1, 2), act).to(down_dtype) if need_down else None
            d_gate_up_proj = torch.bmm(d_gate_up.transpose(1, 2), x).to(gate_up_dtype) if need_gate_up else None
            d_hidden = None
            if need_hidden:
                dx = torch.bmm(d_gate_up, w_gate_up, out=dy)  # dy is spent: reuse its memory
                d_hidden = grad_out.new_zeros(grad_out.shape, dtype=hidden_dtype)
                d_hidden.index_add_(0, rows, dx.view(-1, H).to(hidden_dtype))
        if d_gates is not None:
            d_gates = d_gates.to(gates.dtype)
        return d_hidden, None, d_gates, d_gate_up_proj, d_down, None


def expert_choice_swiglu(flat_hidden, rows, gates, gate_up_proj, down_proj):
    """Run `ExpertChoiceSwiGLU` in the dtype autocast would pick for a matmul (else the weights')."""
    device_type = flat_hidden.device.type
    if torch.is_autocast_enabled(device_type):
        compute_dtype = torch.get_autocast_dtype(device_type)
    else:
        compute_dtype = gate_up_proj.dtype
    return ExpertChoiceSwiGLU.apply(flat_hidden, rows, gates, gate_up_proj, down_proj, compute_dtype)
