import torch

from raystack.checkpoint import load_training_state, save_training_state


def test_model_and_adam_state_round_trip(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)

    def step(m, o):
        x = torch.linspace(-1, 1, 16).reshape(4, 4)
        loss = m(x).pow(2).mean()
        o.zero_grad()
        loss.backward()
        o.step()

    for _ in range(3):
        step(model, opt)
    path = tmp_path / "state.safetensors"
    save_training_state(path, {"m": model}, {"o": opt}, {"rng": torch.tensor([1, 2, 3])}, {"step": 3})

    model2 = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-2)
    free, extra = load_training_state(path, {"m": model2}, {"o": opt2})
    assert extra == {"step": 3} and free["rng"].tolist() == [1, 2, 3]
    step(model, opt)
    step(model2, opt2)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    assert path.read_bytes()[:8] != b"\x80\x02"  # not a pickle
