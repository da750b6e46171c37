"""Models shared by the tests and the benchmarks."""
import torch.nn as nn


class TinyConvNet(nn.Module):
    """One layer of each patchable kind. Input ``(N, 3, 8, 8)`` → ``(N, 5)``."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.up = nn.ConvTranspose2d(8, 4, 2, stride=2)
        self.fc = nn.Linear(4 * 16 * 16, 5)

    def forward(self, x):
        return self.fc(self.up(self.conv(x).relu()).flatten(1))


class PaperAutoEncoder(nn.Module):
    """The paper's shape: 6 conv (Tx) + 6 transposed conv (Rx), BatchNorm + activations, 3×32×32 ↔ 512."""

    def __init__(self, w: int = 8):
        super().__init__()
        c = [3, w, w, 2 * w, 2 * w, 4 * w, 32]
        enc = []
        for i in range(6):
            enc += [nn.Conv2d(c[i], c[i + 1], 3, 2 if i in (1, 3, 5) else 1, 1)]
            if i < 5:
                enc += [nn.BatchNorm2d(c[i + 1]), nn.PReLU()]
        dec = []
        r = c[::-1]
        for i in range(6):
            up = i in (0, 2, 4)
            dec += [nn.ConvTranspose2d(r[i], r[i + 1] if i < 5 else 3, 4 if up else 3, 2 if up else 1, 1)]
            if i < 5:
                dec += [nn.BatchNorm2d(r[i + 1]), nn.PReLU()]
        self.encoder, self.decoder = nn.Sequential(*enc), nn.Sequential(*dec, nn.Sigmoid())

    def forward(self, x):
        return self.decoder(self.encoder(x))
