//! Packed bf16 weights kept across forwards (`keep_packed_weights`) give the bits of packing
//! them each time, and are never used once their weight changed, even in place in the same
//! buffer. Its own binary: the matmul precision and the keeping are the whole process's.

use burn::module::{Param, ParamId};
use burn::nn::Linear;
use burn::tensor::{Device, Distribution, Tensor};
use dino_kernels::{MatmulPrecision, ema, keep_packed_weights, linear, linear_gelu, set_matmul_precision};

fn bits(t: Tensor<2>) -> Vec<u32> {
    t.into_data().try_to_vec::<f32>().unwrap().iter().map(|v| v.to_bits()).collect()
}

fn with_weight(layer: &Linear, weight: Tensor<2>) -> Linear {
    Linear { weight: Param::initialized(ParamId::new(), weight), bias: layer.bias.clone() }
}

#[test]
fn kept_weights_give_the_bits_of_fresh_ones_and_follow_every_change() {
    set_matmul_precision(MatmulPrecision::Bf16);
    let device = Device::flex();
    let normal = Distribution::Normal(0.0, 0.5);
    let (k, n) = (96, 80);
    let x = Tensor::<2>::random([300, k], Distribution::Normal(0.0, 1.0), &device);
    let layer = Linear {
        weight: Param::initialized(ParamId::new(), Tensor::random([k, n], normal, &device)),
        bias: Some(Param::initialized(ParamId::new(), Tensor::random([n], normal, &device))),
    };
    let other = Tensor::<2>::random([k, n], normal, &device);
    // What packing each time gives: this layer, and its weight after an EMA step onto `other`.
    let fresh = bits(linear(&layer, x.clone()));
    let fresh_gelu = bits(linear_gelu(&layer, x.clone()));
    let moved = with_weight(&layer, ema(layer.weight.val(), other.clone(), 0.5));
    let fresh_moved = bits(linear(&moved, x.clone()));
    assert_ne!(fresh, fresh_moved, "the EMA step changes the layer");

    let kept = keep_packed_weights();
    for round in 0..3 {
        assert_eq!(bits(linear(&layer, x.clone())), fresh, "linear, forward {round}");
        assert_eq!(bits(linear_gelu(&layer, x.clone())), fresh_gelu, "linear + GELU, forward {round}");
    }
    // The EMA writes in place into the weight's own buffer when nothing else holds it: the same
    // address, other values. The copy packed from the old values must not be used.
    let (weight, bias) = (layer.weight.val(), layer.bias.clone());
    drop(layer);
    let moved_in_place = Linear { weight: Param::initialized(ParamId::new(), ema(weight, other, 0.5)), bias };
    for round in 0..2 {
        assert_eq!(bits(linear(&moved_in_place, x.clone())), fresh_moved, "after the EMA, forward {round}");
    }
    drop(kept);
    assert_eq!(bits(linear(&moved_in_place, x)), fresh_moved, "after the guard");
    set_matmul_precision(MatmulPrecision::F32);
}
