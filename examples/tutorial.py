"""CHEX in your own training loop: a torchvision ResNet-18 trained on random data for a few steps (CPU, seconds).

    python examples/tutorial.py

The lines between the two ``# ---`` markers are all CHEX needs: find the groups, build an explorer with a schedule,
``start()`` it, call ``after_step()`` after every optimizer step, and export the compact model at the end.
"""
import torch
import torchvision

from chex_core import ChannelExplorer, ExplorationSchedule, compact_model, count_macs, resnet_groups

model = torchvision.models.resnet18(num_classes=10)
optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
steps_per_epoch, epochs = 4, 6
# ---
groups = resnet_groups(model)                                          # conv1/conv2 of every block, by name
schedule = ExplorationSchedule(interval=1, t_max=4, sparsity=0.5, delta0=0.2, steps_per_unit=steps_per_epoch)
explorer = ChannelExplorer(model, groups, schedule)                    # qr CSS + importance regrowth + global γ
explorer.start(optimizer)
for step in range(1, epochs * steps_per_epoch + 1):
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    loss = torch.nn.functional.cross_entropy(model(x), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    explorer.after_step(step, optimizer)                               # re-mask; prune/regrow on event steps
small, widths = compact_model(model, groups, explorer.masks)          # physically smaller copy + width spec
# ---
print(f"density {explorer.density():.2f}, events {explorer.event_count}, "
      f"MACs {count_macs(model, (3, 32, 32)) / 1e6:.1f}M masked = {count_macs(small, (3, 32, 32)) / 1e6:.1f}M "
      f"compact (dense {count_macs(torchvision.models.resnet18(), (3, 32, 32)) / 1e6:.1f}M)")
