"""Distillation: `generate` (distill-data: teacher-written SFT data), `losses` (KD + CE), `train`
(train-student: a smaller causal LM), `task_student` (a classifier trained on the teacher's soft labels)."""
