"""Medical segmentation fine-tuned from pretrained encoders (MONAI FlexibleUNet, plain UNet, smp Unet)."""
