import torch

from sslrun.losses.infonce import in_batch_cross_entropy


def nnclr_loss(nn1: torch.Tensor, nn2: torch.Tensor, p1_all: torch.Tensor, p2_all: torch.Tensor,
               temperature: float, offset: int = 0) -> torch.Tensor:
    """NNCLR's loss (Dwibedi et al. 2021, eq. 2, symmetrised as in its algorithm 1). With NN(z_i)
    the nearest neighbour of view 1's projection z_i in the support set and p+_k the predictions of
    view 2 over the (global) batch, all l2-normalised:

        l(i) = -log[ exp(NN(z_i).p+_i / T) / sum_k exp(NN(z_i).p+_k / T) ]

    and loss = (mean_i l(i) + the same with the views swapped) / 2.

    nn1, nn2: this process's neighbours [B, D] of views 1 and 2 (from the support set: no
    gradient). p1_all, p2_all: the predictions of views 1 and 2 gathered over processes [N, D],
    in which this process's rows start at `offset`.
    """
    return (in_batch_cross_entropy(nn1, p2_all, temperature, offset)
            + in_batch_cross_entropy(nn2, p1_all, temperature, offset)) / 2
