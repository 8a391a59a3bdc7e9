"""Training: the loop (`loop`), the data stream (`stream`), checkpoint files (`checkpoints`), mixed
precision (`precision`) and progress.csv with its loss curves (`plots`)."""
