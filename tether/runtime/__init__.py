"""What every run shares: devices, torch.distributed, checkpoints, logging, timers, the run set-up."""
