//! The fused transformer-block halves give the bits of their layers run one after the other
//! with bf16 products too (on AMX, with the attention heads on their own kernel). Its own
//! binary: the matmul precision is the whole process's.

use burn::module::{Param, ParamId};
use burn::nn::Linear;
use burn::tensor::{Device, Distribution, Tensor};
use dino_kernels::{
    MatmulPrecision, layer_norm, linear, linear_add, linear_gelu, norm_attention_add, norm_mlp_add, self_attention,
    set_matmul_precision,
};

fn layer(k: usize, n: usize, device: &Device) -> Linear {
    let normal = Distribution::Normal(0.0, 0.2);
    Linear {
        weight: Param::initialized(ParamId::new(), Tensor::random([k, n], normal, device)),
        bias: Some(Param::initialized(ParamId::new(), Tensor::random([n], normal, device))),
    }
}

fn same_bits(a: Tensor<3>, b: Tensor<3>) -> bool {
    let (a, b) = (a.into_data().try_to_vec::<f32>().unwrap(), b.into_data().try_to_vec::<f32>().unwrap());
    a.len() == b.len() && a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits())
}

#[test]
fn the_fused_halves_equal_their_layers_in_bf16() {
    set_matmul_precision(MatmulPrecision::Bf16);
    let device = Device::flex();
    // 48 samples of 50 tokens, width 64 (2 heads of 32), hidden 768: enough rows for the fused
    // tiles on two threads or more. An odd width for the hidden layer's last pair: 770.
    let (batch, tokens, width) = (48, 50, 64);
    let x = Tensor::<3>::random([batch, tokens, width], Distribution::Normal(0.0, 1.0), &device);
    let gamma = Tensor::<1>::random([width], Distribution::Normal(1.0, 0.1), &device);
    let beta = Tensor::<1>::random([width], Distribution::Normal(0.0, 0.1), &device);
    let norm = (gamma.clone(), beta.clone(), 1e-6);
    let normed = layer_norm(x.clone(), gamma, beta, 1e-6);
    for hidden in [768, 770] {
        let (fc1, fc2) = (layer(width, hidden, &device), layer(hidden, width, &device));
        let fused = norm_mlp_add(norm.clone(), &fc1, &fc2, x.clone());
        let layers = linear_add(&fc2, linear_gelu(&fc1, normed.clone()), x.clone());
        assert!(same_bits(fused, layers), "MLP, hidden {hidden}");
    }
    let (qkv, proj) = (layer(width, 3 * width, &device), layer(width, width, &device));
    let fused = norm_attention_add(norm, &qkv, &proj, x.clone(), 2);
    let layers = linear_add(&proj, self_attention(linear(&qkv, normed), 2), x);
    assert!(same_bits(fused, layers), "attention");
    set_matmul_precision(MatmulPrecision::F32);
}
