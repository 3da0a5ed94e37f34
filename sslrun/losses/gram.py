import torch
import torch.nn.functional as F


def gram_loss(student_patches: torch.Tensor, teacher_patches: torch.Tensor, clamp_negative: bool = False) -> torch.Tensor:
    """DINOv3's Gram anchoring (Simeoni et al. 2025, sec. 4.2, eq. 3):

        L_Gram = || X_S X_S^T - X_G X_G^T ||_F^2,   averaged over images and entries,

    with X [patches, D] an image's patch features, each row L2-normalised: the student's (S) and
    the Gram teacher's (G, not differentiated). The loss constrains how the patches relate to one
    another, not the features themselves, so the student's patch similarities stay those of an
    earlier, spatially cleaner teacher while its features keep moving. `clamp_negative`: both
    similarity matrices with negative entries set to 0 (the reference's `remove_neg`).

    `student_patches`, `teacher_patches`: [images, patches, D]. Every image has the same patch
    count, so the mean over processes is the global batch's."""
    student = F.normalize(student_patches.float(), dim=-1)
    teacher = F.normalize(teacher_patches.detach().float(), dim=-1)
    student_similarity, teacher_similarity = student @ student.transpose(1, 2), teacher @ teacher.transpose(1, 2)
    if clamp_negative:
        student_similarity, teacher_similarity = student_similarity.clamp(min=0), teacher_similarity.clamp(min=0)
    return (student_similarity - teacher_similarity).pow(2).mean()
