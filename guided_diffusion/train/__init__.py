"""Training: the loop (`loop`), the data stream (`stream`), checkpoint files (`checkpoints`), mixed
precision (`precision`), progress.csv with its loss curves (`plots`) and the commands' flags (`flags`)."""
