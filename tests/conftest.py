import torch

# On 2 shared cores torch's spinning worker threads slow everything down when the other core is
# busy (Ray, a second process); one thread is both faster and steadier for these small tensors.
torch.set_num_threads(1)
