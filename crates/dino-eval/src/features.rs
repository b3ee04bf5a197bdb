//! Frozen features of a backbone, as the official evaluation scripts compute them.

use burn::tensor::Tensor;
use burn::tensor::module::interpolate;
use burn::tensor::ops::{InterpolateMode, InterpolateOptions};
use dino_model::{Backbone, BackboneConfig};

/// Which tokens make the feature vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FeatureSpec {
    /// CLS tokens of the last n blocks, each through the final norm, concatenated
    /// (`eval_linear.py --n_last_blocks`; 1 = the plain DINO feature of `eval_knn.py`).
    pub n_last_blocks: usize,
    /// Also the mean of the last block's patch tokens (`--avgpool_patchtokens`).
    pub avgpool: bool,
}

impl Default for FeatureSpec {
    /// The final-normed CLS token, as `eval_knn.py` and the released features.
    fn default() -> Self {
        Self { n_last_blocks: 1, avgpool: false }
    }
}

impl FeatureSpec {
    /// The CLS tokens of the last `n_last_blocks` of a ViT (1 to its depth), with the mean patch
    /// token when `avgpool`. A ResNet has one feature, its pooled last stage, whatever is asked
    /// (as `eval_linear.py` does for convnets).
    pub fn new(n_last_blocks: usize, avgpool: bool, backbone: &BackboneConfig) -> Result<Self, String> {
        let Some(vit) = backbone.vit() else {
            return Ok(Self::default());
        };
        let depth = vit.depth;
        if n_last_blocks == 0 || n_last_blocks > depth {
            return Err(format!(
                "n_last_blocks = {n_last_blocks}: it must be between 1 and the backbone's {depth} blocks"
            ));
        }
        Ok(Self { n_last_blocks, avgpool })
    }

    /// Width of the feature vector for a backbone of width `embed_dim` (a ResNet: the default
    /// spec).
    pub fn dim(&self, embed_dim: usize) -> usize {
        embed_dim * (self.n_last_blocks + self.avgpool as usize)
    }

    /// Images `[B, 3, H, W]` -> features `[B, dim]`.
    ///
    /// With one block and avgpool, the official code interleaves CLS and pooled values
    /// (`cat((cls.unsqueeze(-1), avg.unsqueeze(-1)), -1).reshape(B, -1)`); we do the same. With
    /// several blocks and avgpool the official code fails on a shape mismatch; we append the
    /// pooled vector after the CLS tokens.
    pub fn forward(&self, backbone: &Backbone, images: Tensor<4>) -> Tensor<2> {
        let Some(vit) = backbone.as_vit() else {
            assert_eq!(*self, Self::default(), "a ResNet's only feature is its pooled map (see FeatureSpec::new)");
            return backbone.forward(images);
        };
        assert!(self.n_last_blocks >= 1, "FeatureSpec: n_last_blocks must be at least 1 (see FeatureSpec::new)");
        let layers = vit.intermediate_layers(images, self.n_last_blocks);
        let [b, n, d] = layers[0].dims();
        let cls: Vec<Tensor<2>> = layers.iter().map(|x| x.clone().narrow(1, 0, 1).reshape([b, d])).collect();
        let cls = Tensor::cat(cls, 1);
        if !self.avgpool {
            return cls;
        }
        let last = layers.last().expect("n_last_blocks >= 1").clone();
        let avg = last.narrow(1, 1, n - 1).mean_dim(1).reshape([b, d]);
        if self.n_last_blocks == 1 {
            Tensor::stack::<3>(vec![cls, avg], 2).reshape([b, 2 * d])
        } else {
            Tensor::cat(vec![cls, avg], 1)
        }
    }
}

/// The scales `utils.multi_scale` averages (`eval_image_retrieval.py --multiscale`).
pub const MULTI_SCALES: [f64; 3] = [1.0, std::f64::consts::FRAC_1_SQRT_2, 0.5];

/// `utils.multi_scale`: the backbone's feature of `images` `[B, 3, H, W]` at each of
/// [`MULTI_SCALES`], averaged, `[B, D]` (not normalised). Each scale resizes the normalised
/// tensor bilinearly without antialiasing to `floor(side * s)`, as `F.interpolate(scale_factor
/// = s)`; PyTorch then maps pixels with `1 / s`, burn with the ratio of the sizes, a sub-pixel
/// difference where `side * s` is not whole.
pub fn multi_scale(backbone: &Backbone, images: Tensor<4>) -> Tensor<2> {
    let [_, _, h, w] = images.dims();
    let features: Vec<Tensor<2>> = MULTI_SCALES
        .iter()
        .map(|&s| {
            if s == 1.0 {
                return backbone.forward(images.clone());
            }
            let size = [((h as f64 * s) as usize).max(1), ((w as f64 * s) as usize).max(1)];
            let options =
                InterpolateOptions::new(InterpolateMode::Bilinear).with_align_corners(false).with_output_size(size);
            backbone.forward(interpolate(images.clone(), options))
        })
        .collect();
    Tensor::stack::<3>(features, 0).mean_dim(0).squeeze_dim::<2>(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_feature_spec_takes_between_one_block_and_all() {
        let vit = BackboneConfig::preset("vit_small", 16).unwrap();
        assert_eq!(FeatureSpec::new(4, true, &vit), Ok(FeatureSpec { n_last_blocks: 4, avgpool: true }));
        assert!(FeatureSpec::new(12, false, &vit).is_ok());
        let resnet = BackboneConfig::preset("resnet50", 16).unwrap();
        assert_eq!(FeatureSpec::new(4, true, &resnet), Ok(FeatureSpec::default()));
        for n in [0, 13] {
            let e = FeatureSpec::new(n, false, &vit).unwrap_err();
            assert_eq!(e, format!("n_last_blocks = {n}: it must be between 1 and the backbone's 12 blocks"));
        }
    }
}
