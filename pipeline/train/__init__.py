"""The train job (`maskrcnn train`): DDP Mask R-CNN on Ray Train.

Driver side:
    driver      train(): check inputs, run TorchTrainer, export STORAGE/NAME/model.safetensors
    options     TrainOptions (the CLI flags) resolved into a TrainSpec by plan_spec
    spec        TrainSpec: all a worker is told, as plain values
Worker side:
    loop        train_loop_per_worker: set up, restore, iterate, report
    learner     the model, optimizer, lr scheduler and grad scaler; one optimizer step
    data        the resumable sample order and augmentation of a worker's shard
    schedule    the learning-rate schedule (linear scaling, warm-up, steps)
    amp         mixed precision: mode, autocast, grad scaler
    checkpoint  a checkpoint directory: save, load, export its model
    evaluator   COCO AP on the validation set (rank 0)
    progress    worker status files, losses averaged over ranks, log lines
"""
