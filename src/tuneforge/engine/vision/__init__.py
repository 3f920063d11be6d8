"""Vision models: a VLM's or a CLIP's loading and trainable parts, image chats and pairs as batches, their losses.

    load_vlm, load_clip, load_processor, trainable_vlm, trainable_clip, vision_parts   models.py
    VisionChatTokenizer, VisionBatcher, PairBatcher, fit_vision_examples               data.py
    VisionLMLoss, ClipLoss                                                             loss.py
    build_tiny_llava_dir, build_tiny_clip_dir                                          tiny.py (tests, smoke jobs)
"""
