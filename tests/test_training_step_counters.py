"""benchmarks/training_step.py, the counters the memory benchmarks report, against bytes counted by hand."""
import torch
from torch import nn

from benchmarks.training_step import peak_saved_activations, state_bytes


def test_state_bytes_are_parameters_gradients_and_adam_moments_of_what_trains_only():
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(3, 5), nn.Linear(5, 2))
    module[1].requires_grad_(False)                       # frozen: not counted
    optimizer = torch.optim.Adam([p for p in module.parameters() if p.requires_grad], lr=1e-3)
    module(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    trained = 3 * 5 + 5                                   # float32 weight + bias of the first layer
    # Adam: exp_avg and exp_avg_sq per parameter, plus a float32 scalar step per parameter tensor
    assert state_bytes(module, [optimizer]) == {"parameters": 4 * trained, "gradients": 4 * trained,
                                                "optimizer_state": 2 * 4 * trained + 2 * 4}


def test_peak_saved_activations_counts_what_autograd_keeps_for_backward():
    weight = torch.randn(6, 7, requires_grad=True)
    x = torch.randn(4, 6)

    def loss_fn(batch):
        # matmul saves x (4x6) for weight's gradient (x has no grad, weight's copy is not needed); tanh saves its
        # output (4x7); the sum saves nothing
        return {"loss": torch.tanh(batch @ weight).sum()}

    assert peak_saved_activations(loss_fn, x) == 4 * (4 * 6 + 4 * 7)
    assert weight.grad is not None and weight.grad.abs().sum() > 0
