//! The smallest model with order-dependent state: views publish `Add(n)`; the model keeps the sum
//! and a hash-like fold that differs if two events execute in another order.

use bevy::ecs::system::RunSystemOnce;
use bevy::prelude::*;
use bevy_synq::prelude::*;
use serde::{Deserialize, Serialize};

/// A view event: add this much.
#[derive(Serialize, Deserialize, Clone)]
pub struct Add(pub u64);

/// The model state: the sum, and an order-dependent fold of the values.
#[derive(Resource, Serialize, Deserialize, Clone, Default, Debug, PartialEq)]
pub struct Sum(pub u64, pub u64);

/// The model.
pub fn model(model: &mut ModelApp) {
    model.init_resource::<Sum>().add_view_event::<Add>().add_observer(
        |add: On<FromView<Add>>, mut sum: ResMut<Sum>| {
            sum.0 += add.0;
            sum.1 = sum.1.wrapping_mul(31).wrapping_add(add.0); // order-dependent
        },
    );
}

/// Publishes `Add(value)` from `app`'s view.
pub fn add(app: &mut App, value: u64) {
    app.world_mut()
        .run_system_once_with(|In(v): In<u64>, mut publish: Publish<Add>| publish.send(Add(v)), value)
        .unwrap();
}
