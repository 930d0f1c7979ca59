/* tinytrain C ABI: train a tinytrain plan on a microcontroller from C.
 *
 * Link libtinytrain.a (crates/tt-mcu/ffi, built for the firmware's target). No allocation: the
 * caller provides every buffer. Every function checks its pointers and lengths and returns
 * TT_OK (0), a positive status, or a negative TT_ERR_* code; tt_status_str() names it.
 *
 * Kept by hand; crates/tt-mcu/ffi's tests and tests/test_mcu_ffi.py check it against the
 * library (constants, struct size, every function).
 */
#ifndef TINYTRAIN_H
#define TINYTRAIN_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define TT_OK 0
#define TT_NO_CHECKPOINT 1           /* tt_*_restore / _load: no valid checkpoint, nothing changed */
#define TT_ERR_NULL -1               /* a required pointer is NULL */
#define TT_ERR_SIZE -2               /* a length does not match what the plan or buffer needs */
#define TT_ERR_ALIGN -3              /* params, arena or the trainer storage misaligned */
#define TT_ERR_OUT_OF_MEMORY -4      /* arena smaller than tt_arena_bytes() */
#define TT_ERR_CORRUPT_PLAN -5       /* plan or parameter blob damaged or not matching */
#define TT_ERR_INVALID -6            /* a parameter outside its valid range */
#define TT_ERR_NOT_REPRESENTABLE -7  /* a value that cannot be represented (scale, shift) */
#define TT_ERR_NON_FINITE -8         /* training diverged (NaN or inf); the step was refused */
#define TT_ERR_FLASH -9              /* a flash callback returned non-zero */
#define TT_ERR_LAYOUT -10            /* checkpoint slots do not fit the flash geometry */
#define TT_ERR_TOO_LARGE -11         /* the learned state does not fit in a checkpoint slot */
#define TT_ERR_VERIFY -12            /* a written checkpoint did not read back valid */
#define TT_ERR_CORRUPT_UPDATE -13    /* update blob truncated, damaged or not matching the plan */
#define TT_ERR_UPDATE_PLAN -14       /* update blob written for another plan (plan tag differs) */

/* Storage for one trainer, owned by the caller (static or stack), 8-byte aligned. */
#define TT_TRAINER_WORDS 64
typedef struct tt_trainer {
    uint64_t opaque[64]; /* TT_TRAINER_WORDS */
} tt_trainer;

/* A NOR flash region, as callbacks. Offsets are relative to the region. The library only
 * programs erased bytes, in whole 32-byte units at 32-byte aligned offsets (write_size must
 * divide 32), and erases whole sectors of erase_size bytes (a multiple of 32). Callbacks return
 * 0 on success. */
typedef struct tt_flash {
    void *ctx;
    uint32_t capacity;
    uint32_t write_size;
    uint32_t erase_size;
    int32_t (*read)(void *ctx, uint32_t offset, uint8_t *buf, uint32_t len);
    int32_t (*write)(void *ctx, uint32_t offset, const uint8_t *buf, uint32_t len);
    int32_t (*erase)(void *ctx, uint32_t from, uint32_t to);
} tt_flash;

/* A static, NUL-terminated description of a status code. */
const char *tt_status_str(int32_t status);

/* SRAM the plan needs for its arena, in bytes. */
int32_t tt_arena_bytes(const uint8_t *plan, size_t plan_len, size_t *out);

/* Checks the plan (CRC, every record), the parameter blob (length, CRC, 4-byte alignment) and
 * the arena (4-byte alignment, size), then loads the initial learned state. plan, params and
 * arena must stay valid and unmoved for the trainer's life. */
int32_t tt_init(tt_trainer *t, const uint8_t *plan, size_t plan_len, const uint8_t *params,
                size_t params_len, uint8_t *arena, size_t arena_len);

/* Int8 elements of one input sample. */
int32_t tt_input_len(const tt_trainer *t, size_t *out);

/* One training step on a labelled int8 sample; *loss gets the loss before the update. */
int32_t tt_step(tt_trainer *t, const int8_t *input, size_t input_len, uint32_t label, float *loss);

/* Steps refused with TT_ERR_NON_FINITE since tt_init (a NaN or inf loss or learning rate is
 * refused before any weight moves; docs/reliability.md). Not checkpointed. */
int32_t tt_skipped_steps(const tt_trainer *t, uint32_t *out);

/* The learning rate of the next steps: the plan's until tt_set_lr changes it. */
int32_t tt_lr(const tt_trainer *t, float *out);

/* Sets the learning rate of the next steps, keeping the weights (e.g. a rate chosen on the host,
 * or a lower one after training collapsed). A NaN or inf rate gives TT_ERR_NON_FINITE, a negative
 * one TT_ERR_INVALID; the rate is then unchanged. Not checkpointed: after tt_init the plan's
 * rate applies again. */
int32_t tt_set_lr(tt_trainer *t, float lr);

/* Forward pass only; *class_out gets the arg-max class. */
int32_t tt_predict(tt_trainer *t, const int8_t *input, size_t input_len, uint32_t *class_out);

/* Fleet update blob (docs/fleet-update-format.md): the trained int8 weights and int32 biases
 * with a sample count, for a gateway to forward to a Flower client unchanged.
 * tt_update_len: its size in bytes (the same for every blob of the plan). */
int32_t tt_update_len(const tt_trainer *t, size_t *out);

/* Writes the update blob of the learned state into out (out_len >= tt_update_len, else
 * TT_ERR_SIZE); *written gets its length. */
int32_t tt_write_update(const tt_trainer *t, uint32_t sample_count, uint8_t *out, size_t out_len,
                        size_t *written);

/* Loads the trained parameters of an update blob of this plan (the fleet's global update). The
 * whole blob is checked (length, CRC, plan tag, every section) before anything changes;
 * *sample_count gets its sample count. */
int32_t tt_apply_update(tt_trainer *t, const uint8_t *blob, size_t blob_len,
                        uint32_t *sample_count);

/* Writes the learned state as a power-loss-safe A/B checkpoint: two slots of slot_size bytes
 * (whole sectors) from base in the flash region; *seq gets its sequence number. */
int32_t tt_save(const tt_trainer *t, const tt_flash *flash, uint32_t base, uint32_t slot_size,
                uint32_t *seq);

/* Restores the newest valid checkpoint of this plan: TT_OK (*seq set) or TT_NO_CHECKPOINT. */
int32_t tt_restore(tt_trainer *t, const tt_flash *flash, uint32_t base, uint32_t slot_size,
                   uint32_t *seq);

/* Checkpoint of any bytes (no trainer): tag identifies what they belong to. */
int32_t tt_checkpoint_save(const tt_flash *flash, uint32_t base, uint32_t slot_size, uint32_t tag,
                           const uint8_t *data, size_t len, uint32_t *seq);

/* TT_OK (data filled, *seq set) or TT_NO_CHECKPOINT (data untouched). */
int32_t tt_checkpoint_load(const tt_flash *flash, uint32_t base, uint32_t slot_size, uint32_t tag,
                           uint8_t *data, size_t len, uint32_t *seq);


#ifdef __cplusplus
}
#endif

#endif /* TINYTRAIN_H */
